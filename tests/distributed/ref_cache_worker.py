"""Run under torchrun (2 ranks) by test_ref_cache.py: DPO's reference cache
(``dpo.shared_reference_logps``) over a sharded reference, each rank counting the pairs its
forwards computed; rank 0 writes the counts, the cache and the one-process cache to argv[1]."""

import copy
import sys

import torch

from rftengine import distributed
from rftengine.methods.data import encode_preferences
from rftengine.methods.dpo import precompute_reference_logps, shared_reference_logps
from rftengine.methods.modeling import Reference
from rftengine.toy import char_tokenizer, tiny_causal_lm

PAIRS = 5  # 3 and 2 over 2 ranks: the short share is padded


def main(out: str) -> None:
    with distributed.process_group("cpu"):
        tok = char_tokenizer()
        model = tiny_causal_lm(len(tok), seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
        pairs = [{"prompt": f"q{i}>", "chosen": "a" * (i % 3 + 1), "rejected": "bb" + "c" * i} for i in range(PAIRS)]
        examples = encode_preferences(tok, pairs)
        whole = precompute_reference_logps(Reference(model, copy.deepcopy(model)), examples, tok.pad_token_id,
                                           batch_size=2)
        reference = Reference(model, distributed.shard_model(copy.deepcopy(model)))
        computed = []
        logprobs = reference.logprobs
        reference.logprobs = lambda batch, **kw: computed.append(batch.num_rows // 2) or logprobs(batch, **kw)
        cache = shared_reference_logps(reference, examples, tok.pad_token_id, batch_size=2)
        counts = distributed.all_gather_objects(computed)
        if distributed.is_main_process():
            torch.save({"counts": counts, "cache": cache, "whole": whole}, out)


if __name__ == "__main__":
    main(sys.argv[1])
