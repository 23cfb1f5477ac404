"""conspo.loading: the one model/tokenizer loader of conspo train, eval and compare."""

from __future__ import annotations

import json

import pytest

from conspo.loading import LoadError, check_model, load_model, load_tokenizer, plain_weights, split_gguf


def test_paths_that_cannot_be_a_model_are_named_before_anything_loads(tmp_path):
    check_model(None)  # the embedded model
    check_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id: left to transformers
    cases = [
        (str(tmp_path / "nowhere"), None, "no such directory"),
        (str(tmp_path), None, "not a model directory (no config.json there)"),
        (str(tmp_path), "m.gguf", "no m.gguf there (--gguf-file)"),
    ]
    (tmp_path / "file.txt").write_text("x")
    cases.append((str(tmp_path / "file.txt"), None, "not a directory"))
    for model, gguf, message in cases:
        with pytest.raises(LoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_model(model, gguf)
    with pytest.raises(LoadError, match="--gguf-file needs --model"):
        check_model(None, "m.gguf")


def test_a_lora_adapter_is_named_as_one_with_the_way_to_a_merged_model(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    with pytest.raises(LoadError) as info:
        check_model(str(adapter))
    message = str(info.value)
    assert "is a LoRA adapter, not a model" in message and "org/base" in message
    assert "merge_and_unload().save_pretrained(dir)" in message and "--lora" in message


def test_a_gguf_file_given_as_the_model_is_split_into_its_directory_and_name(tmp_path):
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"GGUF")
    assert split_gguf(str(tmp_path / "m.Q8_0.gguf"), None) == (str(tmp_path), "m.Q8_0.gguf")
    assert split_gguf(str(tmp_path), "m.Q8_0.gguf") == (str(tmp_path), "m.Q8_0.gguf")
    assert split_gguf("org/name", None) == ("org/name", None)
    check_model(str(tmp_path / "m.Q8_0.gguf"))  # accepted: the file is there


def test_the_embedded_tokenizer_keeps_its_spaces_and_gets_a_pad_token(tiny_dir):
    tokenizer = load_tokenizer(str(tiny_dir))
    assert type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert tokenizer.decode(tokenizer("1 + 2", add_special_tokens=False)["input_ids"]) == "1 + 2"
    assert tokenizer.pad_token is not None


def test_for_training_the_model_stays_on_the_cpu_in_float32_for_evaluation_in_eval_mode(tiny_dir):
    import torch

    trained, _ = load_model(str(tiny_dir), for_training=True)
    evaluated, _ = load_model(str(tiny_dir))
    assert not evaluated.training
    assert next(trained.parameters()).dtype == torch.float32 and next(trained.parameters()).device.type == "cpu"


def test_a_gguf_loaded_model_saves_as_a_plain_model_once_its_quantizer_state_is_cleared(tiny_dir, tmp_path):
    # What from_pretrained(..., gguf_file=..., quantization_config=GgufConfig(dequantize=True)) leaves on a model:
    # the GGUF quantizer attached and the config's quantization_config. transformers refuses to save that.
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = GgufConfig(gguf_file="m.gguf", dequantize=True)
    model.hf_quantizer = GgufHfQuantizer(config)
    model.config.quantization_config = config
    with pytest.raises(ValueError, match="quantized with gguf and is not serializable"):
        model.save_pretrained(tmp_path / "before")
    plain_weights(model)
    model.save_pretrained(tmp_path / "after")
    saved = json.loads((tmp_path / "after" / "config.json").read_text())
    assert "quantization_config" not in saved and getattr(model, "hf_quantizer", None) is None
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "after")
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))

    packed = AutoModelForCausalLM.from_pretrained(tiny_dir)
    packed.hf_quantizer = GgufHfQuantizer(GgufConfig(gguf_file="m.gguf"))  # weights left in GGUF blocks
    with pytest.raises(LoadError, match="stayed packed"):
        plain_weights(packed)
    assert plain_weights(reloaded) is reloaded  # no quantizer: unchanged


def test_train_takes_gguf_file_and_records_it_only_when_given(tiny_dir, tmp_path):
    from conspo.cli import build_train_parser
    from conspo.run import RunError, plan_run

    ns = build_train_parser().parse_args(["--model", str(tiny_dir), "--gguf-file", "m.gguf"])
    assert ns.gguf_file == "m.gguf"
    with pytest.raises(RunError, match="no m.gguf there"):  # checked before anything is written
        plan_run(model=str(tiny_dir), gguf_file="m.gguf", output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    plain = plan_run(model=str(tiny_dir), output_dir=tmp_path / "run")
    assert "gguf_file" not in plain.settings  # (so the hash of every run made before the flag is unchanged)
    (tiny_dir / "m.gguf").write_bytes(b"GGUF")
    try:
        gguf = plan_run(model=str(tiny_dir), gguf_file="m.gguf", output_dir=tmp_path / "run")
    finally:
        (tiny_dir / "m.gguf").unlink()
    assert gguf.settings["gguf_file"] == "m.gguf" and gguf.gguf_file == "m.gguf"
    assert gguf.config_hash != plain.config_hash
