"""A scripted stand-in for the Generator: fixed response token ids per row, real output type."""

import torch

from rftengine.generation.outputs import GenerationOutput


class ScriptedGenerator:
    """``generate`` answers call k with ``script(k, decoded_prompts, max_new_tokens)``: one
    list of response token ids per row (B * num_samples rows), each cut to max_new_tokens; a
    row finishes ("eos") when its ids end with an EOS id. The decoded prompts of every call are
    kept in ``calls``."""

    def __init__(self, tokenizer, script, model=None):
        self.tokenizer = tokenizer
        self.script = script
        self.model = model
        self.max_batch_size = 64
        self.device = torch.device("cpu")
        self.calls = []

    def generate(self, prompts, *, num_samples, max_new_tokens, eos_token_ids, pad_token_id, seed, **_):
        decoded = [self.tokenizer.decode(list(p)) for p in prompts]
        rows = [list(r)[:max_new_tokens] for r in self.script(len(self.calls), decoded, max_new_tokens)]
        self.calls.append(decoded)
        assert len(rows) == len(prompts) * num_samples
        width_p = max(len(p) for p in prompts)
        width_r = max(1, max(len(r) for r in rows))
        n = len(rows)
        seq = torch.full((n, width_p + width_r), pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros(n, width_p, dtype=torch.bool)
        response_mask = torch.zeros(n, width_r, dtype=torch.bool)
        for i, r in enumerate(rows):
            p = list(prompts[i // num_samples])
            seq[i, width_p - len(p):width_p] = torch.tensor(p)
            prompt_mask[i, width_p - len(p):] = True
            if r:
                seq[i, width_p:width_p + len(r)] = torch.tensor(r)
                response_mask[i, :len(r)] = True
        reasons = tuple("eos" if r and r[-1] in eos_token_ids else "length" for r in rows)
        return GenerationOutput(seq, prompt_mask, response_mask, torch.zeros(n, width_r), None, reasons)
