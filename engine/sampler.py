"""The batched sampler.

Order of operations follows SGLang/vLLM: penalties on raw logits, then
temperature, top-k, top-p, min-p, then a draw. Logprobs are reported from the
model's raw distribution. A seeded request draws step ``i`` from a generator
seeded by ``(seed, i)``, so its output does not depend on what else is batched
with it or on which instance sampled which step (prefill samples step 0 in PD).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import torch
from pdserve.common.sampling_params import SamplingParams
from pdserve.model.kernels.step_inputs import to_device


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None)


@dataclass
class PendingSample:
    """Tokens drawn on the device whose copies to the host are in flight."""

    token_ids: torch.Tensor  # [batch] on the device
    host: list[torch.Tensor]  # token ids, then (with logprobs) chosen logprobs, top-k values and ids
    done: torch.cuda.Event | None  # None: the copies were synchronous (CPU)
    params: list[SamplingParams]

    def wait(self) -> SampleResult:
        if self.done is not None:
            self.done.synchronize()
        result = SampleResult(token_ids=self.host[0].tolist())
        if len(self.host) > 1:
            result.logprobs = self.host[1].tolist()
            result.top_logprobs = [[] for _ in self.params]
        if len(self.host) > 3:
            vals, ids = self.host[2].tolist(), self.host[3].tolist()
            result.top_logprobs = [list(zip(ids[i][: p.top_logprobs], vals[i][: p.top_logprobs]))
                                   for i, p in enumerate(self.params)]
        return result


class Sampler:
    def __init__(self, seed: int, device: torch.device, eos_ids: Sequence[int] = ()):
        self.device = device
        self.eos_ids = tuple(eos_ids)  # what min_new_tokens holds back, with each request's stop ids
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], histories: Sequence[tuple[list[int], list[int]]]
    ) -> SampleResult:
        """``histories``: (prompt ids, output ids so far) per row, for penalties and seeds."""
        return self.sample_async(logits, params, histories).wait()

    def sample_async(
        self, logits: torch.Tensor, params: list[SamplingParams], histories: Sequence[tuple[list[int], list[int]]]
    ) -> PendingSample:
        """Draw on the device and start copying the results to the host; the
        tokens stay usable on the device (the overlap schedule feeds them to
        the next step) before :meth:`PendingSample.wait` returns them."""
        if all(map(_ARGMAX_ONLY, params)):  # the common batch: one pass over the rows, at C speed
            return self._pending([argmax_rows(logits)], params)
        logits = logits.float()  # the model's dtype (bf16 on a GPU): widened where more than an argmax runs
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs for p in params) else None
        logits = _add_bias(self._apply_penalties(logits, params, histories), params)
        logits = self._hold_back_ends(logits, params, histories)
        token_ids = self._draw(logits, params, histories)
        parts = [token_ids]
        if raw_logprobs is not None:
            parts.append(raw_logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1))
            k = max((p.top_logprobs for p in params), default=0)
            if k > 0:
                parts.extend(raw_logprobs.topk(k, dim=-1))
        return self._pending(parts, params)

    @staticmethod
    def _pending(parts: list[torch.Tensor], params: list[SamplingParams]) -> PendingSample:
        """Start the copies of ``parts`` (token ids first) to the host."""
        on_gpu = parts[0].is_cuda
        host = [t.to("cpu", non_blocking=on_gpu) for t in parts]  # non-blocking copies land in pinned memory
        done = None
        if on_gpu:
            done = torch.cuda.Event()
            done.record()
        return PendingSample(parts[0], host, done, list(params))

    def _apply_penalties(self, logits, params, histories):
        rows = [i for i, p in enumerate(params) if p.has_penalty]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[-1]
        for i in rows:
            p, (prompt, output) = params[i], histories[i]
            row = logits[i]
            if output and (p.presence_penalty or p.frequency_penalty):
                ids = _on(row.device, output, torch.long)
                # Not bincount: on a GPU it reads the largest id back to size its output.
                counts = torch.zeros(vocab, dtype=row.dtype, device=row.device).index_add_(
                    0, ids, torch.ones(ids.shape[0], dtype=row.dtype, device=row.device))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            if p.repetition_penalty != 1:
                seen = _on(row.device, sorted(set(prompt) | set(output)), torch.long)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        return logits

    def _hold_back_ends(self, logits, params, histories):
        """``logits`` with EOS and the stop ids banned in each row that has fewer
        than ``min_new_tokens`` tokens out (last: no bias can undo it); a copy
        when any row has such a ban."""
        rows = [i for i, p in enumerate(params) if p.min_new_tokens and len(histories[i][1]) < p.min_new_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        width = logits.shape[-1]
        for i in rows:
            p = params[i]
            ends = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids))
            ids = sorted(t for t in ends if t < width)
            if ids:
                logits[i, _on(logits.device, ids, torch.long)] = float("-inf")
        return logits

    def _draw(self, logits, params, histories) -> torch.Tensor:
        out = argmax_rows(logits)
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not rows:
            return out
        idx = _on(logits.device, rows, torch.long)
        probs = _filtered_probs(logits[idx], [params[i] for i in rows])
        noise = torch.empty_like(probs)
        for j, i in enumerate(rows):
            seed = params[i].seed
            gen = self._generator if seed is None else _step_generator(seed, len(histories[i][1]), probs.device)
            noise[j].exponential_(generator=gen)
        # Exponential race: argmax p/E is a draw from p, one kernel for the batch.
        out[idx] = (probs / noise).argmax(dim=-1)
        return out


_ARGMAX_ONLY = attrgetter("argmax_only")


def _add_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``logits`` with each request's ``logit_bias`` added, after the penalties,
    so that a bias of -100 or +100 bans or forces a token whatever they did; a
    copy when any request has one."""
    rows = [i for i, p in enumerate(params) if p.logit_bias_ids]
    if not rows:
        return logits
    logits = logits.clone()  # the caller's may be the model's own buffer
    width = logits.shape[-1]
    for i in rows:
        # The front refuses ids past the row; one that got here anyway is
        # dropped rather than failing the whole step.
        pairs = [(t, b) for t, b in zip(params[i].logit_bias_ids, params[i].logit_bias_values) if t < width]
        if pairs:
            ids, biases = zip(*pairs)
            logits[i].index_add_(0, _on(logits.device, list(ids), torch.long), _on(logits.device, list(biases), logits.dtype))
    return logits


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` (the first maximum of each row). On a GPU a long
    row is reduced in two passes: a one-pass argmax reduces each row in one
    thread block, about 37 us for a 128k vocabulary on an H100 at batch 1,
    where two passes take a few."""
    if not logits.is_cuda or logits.shape[-1] < _TWO_PASS_MIN_VOCAB:
        return logits.argmax(dim=-1)
    return two_pass_argmax(logits, _TWO_PASS_CHUNKS)


_TWO_PASS_MIN_VOCAB = 16384
_TWO_PASS_CHUNKS = 128


def two_pass_argmax(logits: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Argmax of each row of ``[B, n]`` from the maxima of ``num_chunks`` equal
    chunks and of the remainder; the first maximum wins, and a NaN counts as
    the maximum, as in ``torch.argmax``."""
    rows, n = logits.shape
    width = n // num_chunks
    covered = width * num_chunks
    values, within = logits[:, :covered].reshape(rows, num_chunks, width).max(dim=-1)
    chunk = values.argmax(dim=-1, keepdim=True)  # the first chunk that holds the maximum
    best = (chunk * width + within.gather(1, chunk)).squeeze(1)
    if covered == n:
        return best
    best_value = values.gather(1, chunk).squeeze(1)
    tail_value, tail_index = logits[:, covered:].max(dim=-1)
    # The remainder comes last: it wins only with a strictly larger value, or a NaN against none.
    tail_wins = (tail_value > best_value) | (tail_value.isnan() & ~best_value.isnan())
    return torch.where(tail_wins, tail_index + covered, best)


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    mixed = (seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    dev = logits.device
    temps = _on(dev, [p.temperature for p in params], logits.dtype)
    logits = logits / temps.view(-1, 1)
    vocab = logits.shape[-1]
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_ks):
        kth = torch.stack([logits[i].topk(k).values[-1] for i, k in enumerate(top_ks)])
        logits = logits.masked_fill(logits < kth.view(-1, 1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1 for p in params):  # decided from the host's params: no device read
        top_ps = _on(dev, [p.top_p for p in params], probs.dtype)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the first always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_ps.view(-1, 1)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if any(p.min_p > 0 for p in params):
        min_ps = _on(dev, [p.min_p for p in params], probs.dtype)
        threshold = probs.max(dim=-1, keepdim=True).values * min_ps.view(-1, 1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _on(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    # The overlap schedule samples before it launches the next step: nothing here may wait for the GPU.
    return to_device(torch.tensor(values, dtype=dtype), device)
