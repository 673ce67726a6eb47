"""A byte-level BPE trained locally, used as a keras-hub `GPT2Tokenizer`.

`train_tokenizer` trains GPT-2's kind of tokenizer (byte-level BPE, no
unknown tokens, `<|endoftext|>` as the only special token) with the
`tokenizers` package and writes `vocab.json` and `merges.txt`; keras-hub's
`GPT2Tokenizer` reads those two files directly, so the rest of the
comparison uses only keras-hub's own tokenizer.
"""

import json
import os

END_TOKEN = "<|endoftext|>"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"


def train_tokenizer(documents, vocabulary_size, directory):
    """Trains a byte-level BPE on `documents`; returns a `GPT2Tokenizer`.

    Args:
        documents: the training text (a list of strings).
        vocabulary_size: target vocabulary size, `<|endoftext|>` and the
            256 byte tokens included.
        directory: where `vocab.json` and `merges.txt` are written.
    """
    import tokenizers

    bpe = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    # Lines, not one huge string: the trainer counts words per item.
    lines = [line for d in documents for line in d.splitlines(True)]
    bpe.train_from_iterator(
        _chunks(lines, 256),
        vocab_size=vocabulary_size,
        min_frequency=2,
        special_tokens=[END_TOKEN],
        show_progress=False,
    )
    os.makedirs(directory, exist_ok=True)
    bpe.save_model(directory)
    _move_end_token_last(os.path.join(directory, VOCAB_FILE))
    return load_tokenizer(directory)


def _move_end_token_last(vocab_path):
    """Gives `<|endoftext|>` the last id, as in GPT-2's own vocabulary.

    `tokenizers` numbers special tokens first, but keras-hub's
    `GPT2Tokenizer` pads with id 0: were 0 also the end token, `generate`
    would see padding as "end" and stop before the first token. Merges
    refer to token strings, so renumbering ids leaves them valid.
    """
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    tokens = [t for t in sorted(vocab, key=vocab.get) if t != END_TOKEN]
    renumbered = {token: index for index, token in enumerate(tokens)}
    renumbered[END_TOKEN] = len(tokens)
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(renumbered, f, ensure_ascii=False)


def _chunks(lines, size):
    for start in range(0, len(lines), size):
        yield "".join(lines[start : start + size])


def load_tokenizer(directory, sequence_length=None):
    """A keras-hub `GPT2Tokenizer` from `vocab.json` + `merges.txt`."""
    import keras_hub

    vocab = os.path.join(directory, VOCAB_FILE)
    merges = os.path.join(directory, MERGES_FILE)
    for path in (vocab, merges):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Tokenizer file '{path}' is missing; train the tokenizer "
                "again (delete the cache directory to rebuild it)."
            )
    return keras_hub.models.GPT2Tokenizer(
        vocabulary=vocab, merges=merges, sequence_length=sequence_length
    )


def encode_documents(tokenizer, documents):
    """One token stream: each document followed by `<|endoftext|>`."""
    import numpy as np

    end = np.asarray([tokenizer.end_token_id], "int32")
    parts = []
    for doc in documents:
        parts += [encode(tokenizer, doc), end]
    return np.concatenate(parts) if parts else np.zeros((0,), "int32")


def encode(tokenizer, text, chunk_chars=20_000):
    """Token ids of `text` as a flat int32 numpy array.

    The text is tokenized in line-aligned chunks (keras-hub tokenizes a
    batch of strings at once; one huge string is slow).
    """
    import numpy as np

    lines = text.splitlines(keepends=True)
    pieces, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    if not pieces:
        return np.zeros((0,), "int32")
    ids = tokenizer(pieces)
    out = []
    for row in ids:
        row = row.numpy() if hasattr(row, "numpy") else np.asarray(row)
        out.append(np.asarray(row, dtype="int32").reshape(-1))
    return np.concatenate(out)
