"""``--load-format dummy`` with a config of its own shape: serves text, never ids past the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from pdserve.tests.support.server_process import served


def test_dummy_config_with_a_larger_vocabulary_yields_text(tmp_path: Path, model_dir: str) -> None:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["vocab_size"] = 4000  # the built-in tokenizer knows 1000 tokens
    config["tie_word_embeddings"] = False
    path = tmp_path / "wide-vocab.json"
    path.write_text(json.dumps(config))
    flags = ("--model-path", str(path), "--load-format", "dummy", "--page-size", "4", "--max-total-tokens", "1024")
    with served(flags, tmp_path / "dummy.log") as server:
        body = {"input_ids": list(range(5, 25)), "sampling_params": {"max_new_tokens": 24, "ignore_eos": True, "temperature": 1.0}}
        out = server.post("/generate", body).json()
        assert len(out["output_ids"]) == 24
        assert max(out["output_ids"]) < 1000
        assert out["text"]
        info = server.get("/get_model_info").json()
        assert Path(info["model_path"], "config.json").exists()
