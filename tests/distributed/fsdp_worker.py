"""Run under torchrun by test_fsdp.py (and as one process for the reference): one DPO loss and
backward through the fused head on a tiny model, sharded with ``shard_model`` when there are
ranks; writes the full gradients (head and every parameter) and the loss to argv[1]."""

import sys

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from rftengine import distributed
from rftengine.methods.data import collate_preferences, encode_preferences
from rftengine.methods.modeling import output_head, response_hidden
from rftengine.ops import fused_dpo_loss
from rftengine.toy import char_tokenizer, tiny_causal_lm


def main(out: str, tie: str) -> None:
    with distributed.process_group("cpu"):
        tok = char_tokenizer()
        model = tiny_causal_lm(len(tok), seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                               tie_word_embeddings=tie == "tied")
        pairs = [{"prompt": f"q{i}", "chosen": "a" * (i % 3 + 1), "rejected": "bb" + "c" * i} for i in range(4)]
        examples = encode_preferences(tok, pairs)
        idx = distributed.shard_batch(list(range(4)))
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        distributed.shard_model(model)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        with distributed.gathered(model) as sharded:  # the rollout's view: full weights in the modules
            gathered_ok = sharded and all(type(p) is torch.nn.Parameter for p in model.parameters())
        batch = collate_preferences([examples[i] for i in idx], tok.pad_token_id)
        hidden = response_hidden(model, batch)  # the trunk first: it gathers the root unit (head)
        weight, bias = output_head(model)
        loss, _ = fused_dpo_loss(hidden, weight, batch.response_ids, mask=batch.response_mask, bias=bias,
                                 beta=0.5, loss_type="simpo", simpo_gamma=0.1)
        # A share of the global mean: the gradients are summed over the ranks.
        (loss * len(idx) / 4).backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).clone()
        loss_sum = distributed.all_reduce_sum(loss.detach() * len(idx))
        if distributed.is_main_process():
            torch.save({"grads": grads, "loss": loss_sum / 4, "units": len(units), "gathered": gathered_ok,
                        "full_bytes": full_bytes, "counted_bytes": distributed._full_bytes(units)}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
