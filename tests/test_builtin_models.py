"""Built-in models: transformers loads them, builds are reproducible, outputs are usable."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pdserve.model import builtin as bm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

SUBPROCESS_TIMEOUT_S = 120
BENCHMARK_CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"
UNICODE_SAMPLES = [
    "Hello, world!",
    "café naïve résumé Zürich",
    "emoji 🙂🚀 family 👩‍👩‍👧 flag 🇯🇵 skin 👍🏽",
    "中文你好，日本語のテキスト、한국어 문장",
    "  leading spaces, tabs\tand\nnewlines\r\n",
    "never-seen bytes: \u0000 \u00ff \U0001f9ff ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bm.MODEL_DIR_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def tiny_dir(model_root: Path) -> str:
    return bm.ensure_builtin_model("tiny")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir: str):
    return AutoTokenizer.from_pretrained(tiny_dir)


def _env_with_root(root: Path) -> dict[str, str]:
    return {**os.environ, bm.MODEL_DIR_ENV: str(root)}


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_preset_loads_in_transformers(model_root: Path, name: str) -> None:
    spec = bm.PRESETS.get(name)
    path = bm.ensure_builtin_model(name)
    assert Path(path).parent == model_root
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == spec.num_layers
    assert model.config.num_key_value_heads == spec.num_kv_heads
    assert len(tokenizer) == model.config.vocab_size == spec.vocab_size
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == spec.tie_word_embeddings
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in bm.SPECIAL_TOKENS}
    assert set(model.generation_config.eos_token_id) == {
        ids[bm.EOS_TOKEN], ids[bm.IM_END_TOKEN]
    }
    assert tokenizer.bos_token_id == ids[bm.BOS_TOKEN]


def test_small_uses_llama3_rope_scaling(model_root: Path) -> None:
    config = AutoConfig.from_pretrained(bm.ensure_builtin_model("small"))
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 1024


def test_build_is_byte_identical_across_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir: str
) -> None:
    monkeypatch.setenv(bm.MODEL_DIR_ENV, str(tmp_path))
    rebuilt = bm.ensure_builtin_model("tiny")
    assert rebuilt != tiny_dir and Path(rebuilt).name == Path(tiny_dir).name
    for file_name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (Path(rebuilt) / file_name).read_bytes() == (Path(tiny_dir) / file_name).read_bytes()


def test_spec_change_changes_directory() -> None:
    spec = bm.PRESETS.get("tiny")
    assert bm.spec_hash(spec) == bm.spec_hash(dataclasses.replace(spec))
    assert bm.spec_hash(spec) != bm.spec_hash(dataclasses.replace(spec, seed=spec.seed + 1))


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_unicode(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer(text).input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.bos_token_id not in ids[1:]
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_learned_merges(tiny_tokenizer) -> None:
    # A trained BPE encodes common words in far fewer tokens than bytes.
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tiny_tokenizer(text, add_special_tokens=False).input_ids) < len(text) // 2
    for token in bm.SPECIAL_TOKENS:
        assert len(tiny_tokenizer(token, add_special_tokens=False).input_ids) == 1


def test_chat_template_renders_chatml(tiny_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi café 🙂"}]},
    ]
    body = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi café 🙂<|im_end|>\n"
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|begin_of_text|>" + body
    prompt = tiny_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|begin_of_text|>" + body + "<|im_start|>assistant\n"
    ids = tiny_tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.count(tiny_tokenizer.bos_token_id) == 1
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids(bm.IM_END_TOKEN)) == 2


def test_tiny_greedy_generation_is_peaky_and_varied(tiny_dir: str, tiny_tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompts = ["Hello, how are you?", "中文：你好", "1 2 3 4 5", "Once upon a time"]
    gaps = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tiny_tokenizer(prompt).input_ids])
            out = model.generate(
                ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
                pad_token_id=tiny_tokenizer.eos_token_id,
            )
            new_tokens = out.sequences[0, ids.shape[1]:].tolist()
            assert len(set(new_tokens)) >= 8, (prompt, new_tokens)
            for logits in out.logits:
                top2 = logits[0].topk(2).values
                gaps.append((top2[0] - top2[1]).item())
    gaps.sort()
    assert gaps[len(gaps) // 2] > 1.0, "median top-1 margin too small for an oracle"
    assert sum(g > 0.5 for g in gaps) / len(gaps) > 0.8


def test_publish_loser_uses_winner(tmp_path: Path) -> None:
    target = tmp_path / "model-abc"

    def build_while_another_wins(out: Path) -> None:
        (out / "config.json").write_text("{}")
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')

    assert bm._publish(target, build_while_another_wins) == target
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == ["model-abc"]


def test_concurrent_creation_yields_one_valid_directory(tmp_path: Path, tiny_dir: str) -> None:
    code = "from pdserve.model.builtin import ensure_builtin_model as e; print(e('tiny'))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=_env_with_root(tmp_path),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            assert proc.returncode == 0, stderr
            outputs.append(stdout.strip())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert outputs[0] == outputs[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(tiny_dir).name]
    built = Path(outputs[0])
    for file_name in ("model.safetensors", "tokenizer.json"):
        assert (built / file_name).read_bytes() == (Path(tiny_dir) / file_name).read_bytes()


def test_cli_model_path_in_process(tiny_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bm.main(["path", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == tiny_dir
    assert bm.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "tiny" in listing and "small" in listing and "llama-3.2-1b" in listing
    assert bm.main(["path", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_cli_model_path_subprocess(model_root: Path, tiny_dir: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "model", "path", "tiny"],
        env=_env_with_root(model_root), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, check=True,
    )
    printed = result.stdout.strip()
    assert printed == tiny_dir and (Path(printed) / "config.json").is_file()


def test_resolve_model_path(model_root: Path, tiny_dir: str, tmp_path: Path) -> None:
    assert bm.resolve_model_path(None) == tiny_dir
    assert bm.resolve_model_path("tiny") == tiny_dir
    assert bm.resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="neither a built-in model"):
        bm.resolve_model_path(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("llama-3.2-1b.json", {"hidden_size": 2048, "num_hidden_layers": 16,
                               "num_key_value_heads": 8, "vocab_size": 128256,
                               "tie_word_embeddings": True}),
        ("qwen3-0.6b.json", {"hidden_size": 1024, "num_hidden_layers": 28, "head_dim": 128,
                             "num_key_value_heads": 8, "vocab_size": 151936,
                             "tie_word_embeddings": True}),
        ("llama-3.1-8b.json", {"hidden_size": 4096, "num_hidden_layers": 32,
                               "intermediate_size": 14336, "vocab_size": 128256,
                               "tie_word_embeddings": False}),
    ],
)
def test_benchmark_config_dir(model_root: Path, file_name: str, expected: dict) -> None:
    source = BENCHMARK_CONFIGS / file_name
    path = bm.resolve_model_path(str(source))
    assert path == bm.config_dir_for(source) == bm.resolve_model_path(source.stem)
    assert (Path(path) / "config.json").read_bytes() == source.read_bytes()
    config = AutoConfig.from_pretrained(path)
    assert {key: getattr(config, key) for key in expected} == expected
    assert len(AutoTokenizer.from_pretrained(path)) == bm.PRESETS.get("tiny").vocab_size
