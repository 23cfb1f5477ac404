"""The embedded tiny model (conspo.embedded): tokenizer, model from config, cached atomic warm start; greedy
accuracy (conspo.evaluation) on it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conspo import embedded
from conspo.embedded import (
    CHARACTERS,
    TinyModelSpec,
    WarmStartConfig,
    build_model,
    build_tokenizer,
    cache_key,
    load_tiny,
    teacher_answer,
    teacher_target,
    warm_start,
)
from conspo.evaluation import greedy_accuracy, greedy_completions
from conspo.presets import DEFAULT_RL
from conspo.rewards.base import VerifyResult
from conspo.tasks.arithmetic import ArithmeticSpec, make_task

TINY_SPEC = TinyModelSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
TINY_CONFIG = WarmStartConfig(max_steps=3, batch_size=8, val_size=8, eval_every=2, warmup_steps=1)


@pytest.fixture(scope="module")
def task():
    return make_task(difficulty=1, n_train=40, n_test=10)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _warm(task, tmp_path, **kw):
    return warm_start(task, cache_dir=tmp_path, spec=TINY_SPEC, config=TINY_CONFIG, **kw)


# --- tokenizer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["12+7*3=", "  -5 ", "a  b\tc\nd", "".join(CHARACTERS), "x = (3 * 4) - 5 !", "<eos> literal? no: <eos"]
)
def test_tokenizer_round_trip_keeps_every_character(tokenizer, text, tmp_path):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.decode(ids) == text


def test_tokenizer_is_one_token_per_character_with_no_added_specials(tokenizer):
    assert tokenizer("12+7=")["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in "12+7="]
    assert len(tokenizer(" " * 5)["input_ids"]) == 5
    eos = tokenizer.eos_token_id
    assert tokenizer.decode([tokenizer.convert_tokens_to_ids("3"), eos], skip_special_tokens=True) == "3"
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, eos, tokenizer.unk_token_id}) == 4
    assert tokenizer("\u2212")["input_ids"] == [tokenizer.unk_token_id]
    assert tokenizer.padding_side == "left"


def test_chat_template_renders_the_plain_prompt(tokenizer):
    chat = [{"role": "user", "content": "12+7="}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "12+7="
    rendered = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert list(rendered["input_ids"]) == tokenizer("12+7=")["input_ids"]
    full = chat + [{"role": "assistant", "content": "19"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == "12+7=19<eos>"


# --- model ----------------------------------------------------------------------------------------------------


def test_model_built_from_config(tokenizer):
    model = build_model(tokenizer, TINY_SPEC, seed=0)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.vocab_size == len(tokenizer)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 1, 4)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer("1+2=")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, 4, len(tokenizer))
    same = build_model(tokenizer, TINY_SPEC, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))


def test_spec_and_config_validation_names_the_field():
    with pytest.raises(ValueError, match="hidden_size"):
        TinyModelSpec(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="stop_at"):
        WarmStartConfig(stop_at=0.0)
    with pytest.raises(ValueError, match="teacher_slip"):
        WarmStartConfig(teacher_slip=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        WarmStartConfig(batch_size=0)


def test_default_rl_is_a_valid_grpo_setting():
    assert DEFAULT_RL["per_device_train_batch_size"] % DEFAULT_RL["num_generations"] == 0
    assert DEFAULT_RL["max_completion_length"] >= make_task().max_completion_length


# --- the imperfect teacher -----------------------------------------------------------------------------------


def test_teacher_answer_only_moves_odd_integers_and_only_on_a_fraction():
    assert teacher_answer("1+2=", "3", 1.0) == "4"
    assert teacher_answer("9-16=", "-7", 1.0) == "-6"
    assert teacher_answer("20+19=", "39", 1.0) == "40"
    assert teacher_answer("1+3=", "4", 1.0) == "4"  # even answers are never touched
    assert teacher_answer("q", "3", 0.0) == "3"
    assert teacher_answer("q", "3.5", 1.0) == "3.5" and teacher_answer("q", "abc", 1.0) == "abc"
    questions = [f"{i}+0=" for i in range(1, 4000, 2)]
    moved = sum(teacher_answer(q, q.split("+")[0], 0.6) != q.split("+")[0] for q in questions) / len(questions)
    assert 0.55 < moved < 0.65
    assert [teacher_answer(q, "7", 0.6) for q in questions[:50]] == [
        teacher_answer(q, "7", 0.6) for q in questions[:50]
    ]


# --- warm start and its cache --------------------------------------------------------------------------------


def test_teacher_target_keeps_the_steps_and_slips_only_the_final_number():
    task = make_task(difficulty=ArithmeticSpec(3, 2, "+-"), n_train=400, n_test=1, seed=0, worked=True)
    slipped = 0
    for p in task.train:
        assert teacher_target(p, 0.0) == p["solution"]
        target = teacher_target(p, 1.0)
        head, final = target.rsplit("=", 1)
        assert head == p["solution"].rsplit("=", 1)[0]
        if int(p["answer"]) % 2:
            assert int(final) == int(p["answer"]) + 1
            slipped += 1
        else:
            assert final == p["answer"]
        # A fractional slip follows the CPU testbed's teacher exactly, problem by problem.
        assert teacher_target(p, 0.6).rsplit("=", 1)[1] == teacher_answer(p["question"], p["answer"], 0.6)
    assert 100 < slipped < 300
    bare = {"question": "3+4=", "answer": "7"}
    assert teacher_target(bare, 1.0) == "8" and teacher_target(bare, 0.0) == "7"


def test_worked_problems_hash_their_solutions_and_bare_ones_as_before():
    worked = make_task(difficulty=1, n_train=60, n_test=10, worked=True)
    bare = make_task(difficulty=1, n_train=60, n_test=10)
    assert cache_key(worked, TINY_SPEC, TINY_CONFIG, 0) != cache_key(bare, TINY_SPEC, TINY_CONFIG, 0)
    # Dropping the solutions from the worked task gives the bare task's key back: no old cache is invalidated.
    stripped = dataclasses.replace(worked, name="arithmetic", max_completion_length=bare.max_completion_length,
                                   train=[{k: v for k, v in p.items() if k != "solution"} for p in worked.train])
    assert cache_key(stripped, TINY_SPEC, TINY_CONFIG, 0) == cache_key(bare, TINY_SPEC, TINY_CONFIG, 0)


def test_warm_start_writes_a_cache_transformers_loads(task, tmp_path):
    path = _warm(task, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("tiny-")
    assert {"config.json", "tokenizer.json", "warm_start.json"} <= {p.name for p in path.iterdir()}
    info = json.loads((path / "warm_start.json").read_text())
    assert info["steps"] <= 3 and info["key"] in path.name
    model, tok = load_tiny(path)
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.decode(tok("7 - 3")["input_ids"]) == "7 - 3"
    assert not model.training
    again = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left behind


def test_second_call_reuses_the_cache_and_force_retrains(task, tmp_path, monkeypatch):
    calls = []
    real = embedded.supervised_train

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedded, "supervised_train", counting)
    first = _warm(task, tmp_path)
    assert _warm(task, tmp_path) == first and len(calls) == 1
    assert _warm(task, tmp_path, force=True) == first and len(calls) == 2
    assert _warm(task, tmp_path, seed=1) != first and len(calls) == 3
    assert len(list(tmp_path.iterdir())) == 2


def test_cache_key_covers_what_decides_the_weights(task):
    base = cache_key(task, TINY_SPEC, TINY_CONFIG, 0)
    assert base == cache_key(task, TINY_SPEC, TINY_CONFIG, 0)
    other_problems = dataclasses.replace(task, train=task.train[1:])
    variants = [
        cache_key(task, TINY_SPEC, TINY_CONFIG, 1),
        cache_key(task, dataclasses.replace(TINY_SPEC, num_hidden_layers=2), TINY_CONFIG, 0),
        cache_key(task, TINY_SPEC, dataclasses.replace(TINY_CONFIG, learning_rate=1e-4), 0),
        cache_key(task, TINY_SPEC, dataclasses.replace(TINY_CONFIG, teacher_slip=0.0), 0),
        cache_key(other_problems, TINY_SPEC, TINY_CONFIG, 0),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_steps_override_changes_the_key(task, tmp_path):
    assert warm_start(task, cache_dir=tmp_path, spec=TINY_SPEC, config=TINY_CONFIG, steps=2) != _warm(task, tmp_path)


def test_interrupted_warm_start_leaves_no_cache(task, tmp_path, monkeypatch):
    def broken_dump(*args, **kwargs):  # the last file of the cache fails to write
        raise OSError("disk full")

    monkeypatch.setattr(embedded.json, "dumps", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        _warm(task, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    path = _warm(task, tmp_path)  # a later call trains and writes it normally
    assert (path / "warm_start.json").is_file()


def test_interrupted_training_leaves_no_cache(task, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "supervised_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _warm(task, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSPO_CACHE", str(tmp_path / "c"))
    assert embedded.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CONSPO_CACHE")
    assert embedded.default_cache_dir() == embedded.Path.home() / ".cache" / "conspo"


def test_supervised_phase_learns_a_memorisable_task(tokenizer):
    # one problem repeated: a few steps of the supervised loop must fit it (the prompt is masked out).
    task = dataclasses.replace(
        make_task(difficulty=1, n_train=10, n_test=2), train=[{"question": "1+2=", "answer": "3"}] * 12
    )
    model = build_model(tokenizer, TINY_SPEC, seed=0)
    config = WarmStartConfig(max_steps=60, batch_size=4, val_size=2, eval_every=10, learning_rate=1e-2, teacher_slip=0)
    summary = embedded.supervised_train(model, tokenizer, task, config)
    assert summary["val_accuracy"] == 1.0 and summary["steps"] < 60
    assert greedy_completions(model, tokenizer, ["1+2="], max_new_tokens=4) == ["3"]


# --- greedy evaluation --------------------------------------------------------------------------------------


def test_greedy_completions_do_not_depend_on_batching(tokenizer):
    model = build_model(tokenizer, TINY_SPEC, seed=3)
    prompts = ["1+2=", "12+34=", "9-9=", "5*7+1="]
    batched = greedy_completions(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    single = [greedy_completions(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert greedy_completions(model, tokenizer, prompts, max_new_tokens=5, batch_size=3) == batched


def test_greedy_accuracy_is_the_fraction_answered_correctly(tokenizer, task):
    model = build_model(tokenizer, TINY_SPEC, seed=0)
    always, never = (lambda c, a: _score(1.0)), (lambda c, a: _score(0.0))
    assert greedy_accuracy(model, tokenizer, task.test, always) == 1.0
    assert greedy_accuracy(model, tokenizer, task.test, never) == 0.0
    assert math.isnan(greedy_accuracy(model, tokenizer, [], never))  # no problems: no measurement, not 0.0
    # Partial credit is not correct (score >= 1 is, as for avg@k): 0.5 on every problem, 1.0 on the first of 4.
    assert greedy_accuracy(model, tokenizer, task.test, lambda c, a: _score(0.5)) == 0.0
    first = task.test[0]["answer"]
    scored = greedy_accuracy(model, tokenizer, task.test[:4], lambda c, a: _score(1.0 if a == first else 0.5))
    assert scored == sum(p["answer"] == first for p in task.test[:4]) / 4
    def broken(c, a):
        raise RuntimeError("verifier bug")
    assert greedy_accuracy(model, tokenizer, task.test[:2], broken) == 0.0  # a raising verifier scores 0
    seen = []
    greedy_accuracy(model, tokenizer, task.test[:3], lambda c, a: seen.append(a) or _score(0.0), batch_size=2)
    assert seen == [p["answer"] for p in task.test[:3]]
    for mode in (True, False):  # evaluation puts the model back in the mode it found it in
        model.train(mode)
        greedy_accuracy(model, tokenizer, task.test[:2], never)
        assert model.training is mode


def _score(x):
    return VerifyResult(score=x, extracted=None, reason="match" if x else "mismatch")


# --- the prompt (issue 13, item 5) -----------------------------------------------------------------------------


def _key_before_conspo_prompts(task, spec, config, seed):
    """cache_key as it was computed when the warm start prompted with ``question + instruction``."""
    import hashlib

    problems = hashlib.sha256()
    for p in task.train:
        fields = [p["question"], p["answer"]] + ([p["solution"]] if "solution" in p else [])
        problems.update(json.dumps(fields).encode())
        problems.update(b"\n")
    blob = json.dumps({"version": "tiny-v3", "task": task.name, "instruction": task.instruction,
                       "max_completion_length": task.max_completion_length, "train": problems.hexdigest(),
                       "model": dataclasses.asdict(spec),
                       # (WarmStartConfig had no max_seconds then; None leaves it out of the key)
                       "warm_start": {k: v for k, v in dataclasses.asdict(config).items() if k != "max_seconds"},
                       "seed": seed},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def test_cache_key_changes_exactly_where_the_warm_start_prompt_changed(task):
    # The arithmetic tasks have no instruction: their prompt is the question, before and now, so the key (and every
    # existing cache of the embedded default) stays as it was.
    for t in (task, make_task(difficulty=1, n_train=40, n_test=10, worked=True)):
        assert t.instruction == ""
        assert cache_key(t, TINY_SPEC, TINY_CONFIG, 0) == _key_before_conspo_prompts(t, TINY_SPEC, TINY_CONFIG, 0)
    # With an instruction the warm start used to see "question" + instruction and now sees "question\ninstruction",
    # so a cache trained on the old prompt must not be found.
    instructed = dataclasses.replace(task, instruction="Put your final answer within \\boxed{}.")
    assert cache_key(instructed, TINY_SPEC, TINY_CONFIG, 0) != _key_before_conspo_prompts(
        instructed, TINY_SPEC, TINY_CONFIG, 0)
    other = dataclasses.replace(task, instruction="Answer:")
    assert len({cache_key(t, TINY_SPEC, TINY_CONFIG, 0) for t in (task, instructed, other)}) == 3


def test_warm_start_trains_on_the_prompt_rl_sees(tokenizer):
    problems = [{"question": "1+2=", "answer": "3"}, {"question": "10-4=", "answer": "6"}]
    for instruction, prompt in (("", "1+2="), ("Say it.", "1+2=\nSay it.")):
        ids, labels = embedded._encode_examples(tokenizer, problems, instruction)
        start = int((labels[0] != -100).nonzero()[0])
        assert tokenizer.decode(ids[0, :start].tolist()) == prompt
        assert tokenizer.decode(ids[0, start:].tolist()) == "3<eos>" + "<pad>" * (ids.shape[1] - start - 2)


def test_greedy_accuracy_prompts_as_rl_does_with_either_template(tokenizer, task, monkeypatch):
    model = build_model(tokenizer, TINY_SPEC, seed=0)
    seen = []
    real = model.generate

    def generate(**kwargs):
        seen.append(kwargs["input_ids"][kwargs["attention_mask"].bool()].tolist())
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    problems = task.test[:1]
    for template in ("plain", "chat"):
        greedy_accuracy(model, tokenizer, problems, lambda c, a: _score(0.0), instruction="Go.", template=template)
    assert seen[0] == seen[1] == tokenizer(problems[0]["question"] + "\nGo.")["input_ids"]


def test_greedy_decoding_ignores_the_checkpoints_generation_config(tokenizer):
    # A checkpoint's repetition_penalty / no_repeat_ngram_size would change greedy completions; evaluation blanks
    # the model's generation config while decoding (and restores it), so only the settings it passes apply.
    model = build_model(tokenizer, TINY_SPEC, seed=3)
    prompts = ["1+2=", "12+34=", "9-9=", "5*7+1="]
    plain = greedy_completions(model, tokenizer, prompts, max_new_tokens=6)
    own = model.generation_config
    own.repetition_penalty, own.no_repeat_ngram_size = 5.0, 1
    direct = tokenizer.batch_decode(model.generate(**tokenizer(prompts[:1], return_tensors="pt"), do_sample=False,
                                                   max_new_tokens=6)[:, 4:], skip_special_tokens=True)
    assert greedy_completions(model, tokenizer, prompts, max_new_tokens=6) == plain
    assert direct != plain[:1]  # (the settings do change what generate() gives when they are applied)
    assert model.generation_config is own and own.repetition_penalty == 5.0


def test_a_time_boxed_warm_start_stops_at_the_first_evaluation_past_the_box(tokenizer, task):
    model = build_model(tokenizer, TINY_SPEC, seed=0)
    config = WarmStartConfig(max_steps=50, batch_size=4, val_size=8, eval_every=20, warmup_steps=1,
                             max_seconds=1e-9, stop_at=1.0)
    summary = embedded.supervised_train(model, tokenizer, task, config)
    assert summary["steps"] == 1 and len(summary["history"]) == 1  # evaluated once, at the box, then stopped
    with pytest.raises(ValueError, match="max_seconds must be a number of seconds > 0"):
        WarmStartConfig(max_seconds=0)
    # The box enters the cache key only when set: every key made before the field existed is unchanged.
    assert cache_key(task, TINY_SPEC, TINY_CONFIG, 0) != cache_key(
        task, TINY_SPEC, dataclasses.replace(TINY_CONFIG, max_seconds=5.0), 0)


def test_named_scales_are_valid_shapes():
    from conspo.embedded import SCALES

    assert SCALES["tiny"] == TinyModelSpec() and set(SCALES) == {"tiny", "base", "large", "smoke"}
    params = {name: sum(p.numel() for p in build_model(build_tokenizer(), spec).parameters()) / 1e6
              for name, spec in SCALES.items() if name != "large"}
    assert params["smoke"] < params["tiny"] < 1 < 30 < params["base"] < 40
