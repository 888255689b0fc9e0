"""bf16 greedy decoding through pdserve against transformers on the same GPU
and the same dummy weights (the Llama-3.2-1B and Qwen3-0.6B shapes).

pdserve's dummy-initialised model is exported under Hugging Face's names and
loaded by transformers. The 64 prompts are prefilled as one pdserve batch
(the way the engine batches them); transformers runs each prompt alone. The
first greedy token must agree on at least 63 prompts and the log-probability
of transformers' choice may differ by at most 0.05 on average.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"
NUM_PROMPTS = 64


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(8, 400, (NUM_PROMPTS,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _pdserve_first_tokens(runner, prompts: list[list[int]]) -> torch.Tensor:
    """Float32 log-probabilities of each prompt's next token, one prefill batch."""
    from pdserve.common.request import Req
    from pdserve.common.sampling import SamplingParams
    from pdserve.common.scheduler import ScheduledBatch

    reqs = []
    for i, p in enumerate(prompts):
        req = Req(str(i), p, SamplingParams(temperature=0))
        req.pages = runner.pool.alloc(-(-(len(p) + 1) // runner.cfg.page_size))
        reqs.append(req)
    logits = runner.forward(ScheduledBatch(False, reqs, prompts, [0] * len(prompts)))
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("model", ["llama-3.2-1b", "qwen3-0.6b"])
def test_first_token_and_logprobs_match_transformers(model: str, tmp_path: Path) -> None:
    from pdserve.common.builtin_models import config_dir_for
    from pdserve.common.config import ServerConfig
    from pdserve.common.model_config import ModelConfig
    from pdserve.common.model_runner import ModelRunner
    from pdserve.common.weights import hf_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model_dir = config_dir_for(CONFIGS / f"{model}.json")
    cfg = ServerConfig(model_path=model_dir, load_format="dummy", dtype="bfloat16", max_total_tokens=32768,
                       cuda_graph_bs=(1,), random_seed=7)
    runner = ModelRunner(cfg, model_dir, ModelConfig.from_dir(model_dir))
    save_file(hf_state_dict(runner.model), str(tmp_path / "model.safetensors"))
    shutil.copy(Path(model_dir) / "config.json", tmp_path / "config.json")
    prompts = _prompts(runner.model_cfg.vocab_size)
    ours = _pdserve_first_tokens(runner, prompts)
    del runner
    gc.collect()
    torch.cuda.empty_cache()

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    agree, diffs = 0, []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            theirs = torch.log_softmax(hf(torch.tensor([p], device="cuda")).logits[0, -1].float(), dim=-1)
            choice = int(theirs.argmax())
            agree += int(ours[i].argmax()) == choice
            diffs.append(abs(float(ours[i, choice] - theirs[choice])))
    mean_diff = sum(diffs) / len(diffs)
    print(f"{model}: first token agrees on {agree}/{NUM_PROMPTS}, mean |logprob diff| {mean_diff:.4f}")
    assert agree >= NUM_PROMPTS - 1
    assert mean_diff <= 0.05
