"""The built-in model under transformers: greedy continuations and per-step
log-probabilities the server must reproduce."""

from __future__ import annotations


class HFOracle:
    """The built-in model under transformers: the reference for greedy decoding."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._cache: dict[tuple[tuple[int, ...], int], tuple[list[int], list[list[float]]]] = {}

    def _run(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], list[list[float]]]:
        key = (tuple(ids), max_new_tokens)
        if key not in self._cache:
            from transformers import GenerationConfig

            # eos_token_id=None: decode exactly max_new_tokens, as ignore_eos does.
            gen_cfg = GenerationConfig(
                do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True,
            )
            input_ids = self._torch.tensor([ids])
            # An explicit mask: generate() would otherwise mask every pad_token_id (BOS here).
            mask = self._torch.ones_like(input_ids)
            with self._torch.no_grad():
                out = self.model.generate(input_ids, attention_mask=mask, generation_config=gen_cfg)
            new_ids = out.sequences[0, len(ids) :].tolist()
            logprobs = [self._torch.log_softmax(step[0].float(), dim=-1).tolist() for step in out.logits]
            self._cache[key] = (new_ids, logprobs)
        return self._cache[key]

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation of ``ids``, EOS ignored."""
        return list(self._run(ids, max_new_tokens)[0])

    def greedy_logprobs(self, ids: list[int], max_new_tokens: int) -> list[float]:
        """log_softmax of the raw logits at each step, at the greedy token."""
        new_ids, steps = self._run(ids, max_new_tokens)
        return [steps[i][t] for i, t in enumerate(new_ids)]

    def top_logprobs(self, ids: list[int], max_new_tokens: int, k: int) -> list[list[tuple[int, float]]]:
        _, steps = self._run(ids, max_new_tokens)
        result = []
        for step in steps:
            order = sorted(range(len(step)), key=lambda t: -step[t])[:k]
            result.append([(t, step[t]) for t in order])
        return result

    def chat_ids(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # Newer transformers return a BatchEncoding here, older ones a list.
        return list(out if isinstance(out, list) else out["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
