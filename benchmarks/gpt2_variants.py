"""The GPT-2 training variants the W1/W2 benchmark compares, and their
builders (also used by `benchmarks.inference`, `benchmarks.profiles` and the
tests).

- `full`: every weight of a keras-hub `GPT2CausalLM` trains;
- `builtin`: Keras's built-in LoRA (`backbone.enable_lora`);
- `keras_lora`: `keras_lora.apply_lora`;
- `peft`: PEFT LoRA on a Hugging Face `GPT2LMHeadModel` of the same shape
  (PyTorch, trained with the usual PyTorch loop).

Each builds into a `Variant` whose `step()` runs one training step: Keras
variants through `model.train_on_batch` (Keras's own compiled train step, as
`fit` runs it), PEFT with zero_grad / forward / backward / optimizer.step.
Same optimizer (Adam, lr 1e-4), same loss (next-token cross-entropy over the
full vocabulary, computed on (tokens, vocabulary) rows: `lm_loss`), random
weights, dropout off.
"""

import dataclasses
import warnings

import keras
import numpy as np

import keras_lora as kl

VOCAB = 50257
RANK = 4
LEARNING_RATE = 1e-4
# Keras layer names of the adapted projections and PEFT's equivalents
# (Hugging Face GPT-2 fuses query/key/value into one `c_attn`, and names
# both the attention output and the second feed-forward layer `c_proj`).
TARGETS = {
    "query_value": {
        "keras": ["query", "value"],
        "peft": ["c_attn"],
    },
    "all_linear": {
        "keras": [
            "query",
            "key",
            "value",
            "attention_output",
            "feedforward_intermediate_dense",
            "feedforward_output_dense",
        ],
        "peft": ["c_attn", "c_proj", "c_fc"],
    },
}
# The QLoRA configuration for a tied-embedding model: every linear layer
# of the blocks and the token embedding (whose reverse projection gives
# the logits; on an int8 base it must be adapted for gradients to reach
# the blocks, see keras_lora's LoraEmbedding).
TARGETS["all_linear_embedding"] = {
    "keras": TARGETS["all_linear"]["keras"] + ["token_embedding"],
    "peft": TARGETS["all_linear"]["peft"] + ["wte"],
}
WORKLOADS = {
    "w1": {
        "label": "W1 gpt2-mini",
        "num_layers": 4,
        "hidden_dim": 256,
        "num_heads": 4,
        "seq": 128,
        "batch": 8,
        "vocab": VOCAB,
        "targets": "query_value",
    },
    "w2": {
        "label": "W2 gpt2-base shape",
        "num_layers": 12,
        "hidden_dim": 768,
        "num_heads": 12,
        "seq": 128,
        "batch": 4,
        "vocab": VOCAB,
        "targets": "all_linear",
    },
}
VARIANTS = ("full", "builtin", "keras_lora", "peft")


@dataclasses.dataclass
class Variant:
    """One way to train the model: `step()` runs a training step, blocks
    until it is done and returns the loss (computed before the update)."""

    name: str
    step: object
    model: object
    trainable_params: int
    total_params: int


def build_backbone(shape, seed=0):
    """A keras-hub `GPT2Backbone` of `shape`, random weights, no dropout."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=shape["vocab"],
        num_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        hidden_dim=shape["hidden_dim"],
        intermediate_dim=4 * shape["hidden_dim"],
        dropout=0.0,
        max_sequence_length=shape["seq"],
    )


def build_keras_model(variant, shape, rank=RANK, seed=0, quantize=None):
    """The `GPT2CausalLM` of a Keras variant (`full`, `builtin`,
    `keras_lora`); the base weights depend on `seed` only. `quantize`
    (`"int8"`, `"int4"`): `model.quantize(quantize)` before LoRA is added,
    as in Keras's QLoRA recipe."""
    import keras_hub

    targets = TARGETS[shape["targets"]]["keras"]
    backbone = build_backbone(shape, seed)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    if quantize is not None:
        with warnings.catch_warnings():
            # Keras warns for every layer type it cannot quantize.
            warnings.simplefilter("ignore")
            model.quantize(quantize)
    if variant == "builtin":
        if shape["targets"] == "query_value":
            backbone.enable_lora(rank)  # keras-hub's default: query/value
        else:
            backbone.enable_lora(rank, target_layer_names=targets)
    elif variant == "keras_lora":
        config = kl.LoraConfig(rank=rank, target_modules=targets)
        kl.apply_lora(model, config)
    elif variant != "full":
        raise ValueError(f"Unknown Keras variant {variant!r}.")
    return model


def keras_batch(shape, seed=1):
    """`(x, y)`: random token ids and their next tokens (causal LM)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, shape["vocab"], (shape["batch"], shape["seq"] + 1))
    tokens = tokens.astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((shape["batch"], shape["seq"]), "int32"),
    }
    return x, tokens[:, 1:]


def count_params(variables):
    unique = {id(v): v for v in variables}.values()
    return int(sum(int(np.prod(v.shape)) for v in unique))


def lm_loss():
    """The Keras variants' loss: next-token cross-entropy computed on
    (tokens, vocabulary) rows (`kl.losses.TokenCrossEntropy`), the same
    values as `SparseCategoricalCrossentropy(from_logits=True)` and what
    PEFT's `GPT2LMHeadModel` computes (`python -m benchmarks.profiles loss`
    times both)."""
    return kl.losses.TokenCrossEntropy()


def keras_variant(
    variant,
    shape,
    rank=RANK,
    seed=0,
    jit_compile="auto",
    run_eagerly=False,
    quantize=None,
):
    """A compiled Keras variant whose `step` is `model.train_on_batch`
    (`run_eagerly=True` is for tests: no tracing or compiling; `quantize`:
    see `build_keras_model`)."""
    model = build_keras_model(
        variant, shape, rank=rank, seed=seed, quantize=quantize
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=lm_loss(),
        weighted_metrics=[],
        jit_compile=False if run_eagerly else jit_compile,
        run_eagerly=run_eagerly,
    )
    x, y = keras_batch(shape)

    def step():
        return float(model.train_on_batch(x, y, return_dict=True)["loss"])

    return Variant(
        name=variant,
        step=step,
        model=model,
        trainable_params=count_params(model.trainable_weights),
        total_params=count_params(model.weights),
    )


def build_peft_model(shape, rank=RANK, seed=0):
    """A Hugging Face `GPT2LMHeadModel` of `shape` with PEFT LoRA on the
    modules equivalent to the Keras targets (random weights, no dropout)."""
    import peft
    import torch
    import transformers

    # Quiet: warnings about a tiny test vocabulary and deprecations.
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=shape["vocab"],
        n_positions=shape["seq"],
        n_embd=shape["hidden_dim"],
        n_layer=shape["num_layers"],
        n_head=shape["num_heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=shape["vocab"] - 1,
        eos_token_id=shape["vocab"] - 1,
    )
    model = transformers.GPT2LMHeadModel(config)
    lora_config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,  # scale 1, as Keras's built-in and keras_lora's
        lora_dropout=0.0,
        target_modules=TARGETS[shape["targets"]]["peft"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores (in, out) kernels
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora_config)


def peft_autocast(device):
    """The `torch.autocast` matching Keras's global dtype policy: none under
    `float32`, bfloat16 under `mixed_bfloat16` (float32 weights, bfloat16
    compute, as the Keras variants then run)."""
    import contextlib

    import torch

    policy = keras.config.dtype_policy()
    if policy.compute_dtype == policy.variable_dtype:
        return contextlib.nullcontext()
    if policy.compute_dtype != "bfloat16":
        raise ValueError(
            f"peft_variant: Keras dtype policy {policy.name!r} has no PEFT "
            "counterpart here; use 'float32' or 'mixed_bfloat16' (float16 "
            "would need a gradient scaler)."
        )
    return torch.autocast(device, dtype=torch.bfloat16)


def peft_variant(shape, rank=RANK, seed=0):
    """PEFT LoRA trained with the standard PyTorch loop (eager, Adam), on
    the GPU when PyTorch sees one; under a mixed Keras dtype policy the
    forward pass runs in `torch.autocast` (`peft_autocast`)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_peft_model(shape, rank=rank, seed=seed).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    x, _ = keras_batch(shape)
    # Hugging Face shifts the labels itself: the same next-token loss.
    ids = torch.as_tensor(np.asarray(x["token_ids"]), dtype=torch.long)
    ids = ids.to(device)

    autocast = peft_autocast(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())  # synchronises

    every = {id(p): p for p in model.parameters()}.values()
    return Variant(
        name="peft",
        step=step,
        model=model,
        trainable_params=int(sum(p.numel() for p in params)),
        total_params=int(sum(p.numel() for p in every)),
    )


def build_variant(name, shape, seed=0, jit_compile="auto"):
    if name == "peft":
        return peft_variant(shape, seed=seed)
    return keras_variant(name, shape, seed=seed, jit_compile=jit_compile)
