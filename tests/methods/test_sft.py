"""SFT on (prompt, response) pairs: the loss is the token-mean NLL of the response, and it falls."""

import pytest
import torch

from rftengine.methods.data import encode_prompt, encode_response, make_sequence_batch
from rftengine.methods.sft import SFTConfig, sft_loss, train_sft

DATA = [{"prompt": "ab> ", "response": "banana"}, {"prompt": "xyz> ", "response": "kiwi"},
        {"prompt": "q> ", "response": "apple pie"}]


def test_sft_loss_is_response_token_nll(make_lm, tokenizer):
    """Against an unfused float64 reference: full logits, log-softmax, shift by one, response
    tokens (EOS included) only."""
    model = make_lm(seed=1)
    prompts = [encode_prompt(tokenizer, d["prompt"]) for d in DATA]
    responses = [encode_response(tokenizer, d["response"]) for d in DATA]
    batch = make_sequence_batch(prompts, responses, tokenizer.pad_token_id)
    loss, stats = sft_loss(model, batch)
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(ids).logits.double()[0, :-1], dim=-1)
            for t, tok in enumerate(r):
                nll -= float(logp[len(p) - 1 + t, tok])
                count += 1
    assert float(loss.detach()) == pytest.approx(nll / count, rel=1e-5)
    assert float(stats["completions/mean_length"]) == pytest.approx(count / len(DATA))


def test_train_sft_lowers_the_loss(make_lm, tokenizer):
    model = make_lm(seed=2)
    history = []
    result = train_sft(model, tokenizer, DATA, SFTConfig(learning_rate=3e-3, batch_size=3, max_steps=15),
                       callback=lambda s, m: history.append(m["loss"]))
    assert len(history) == 15 and result.state.step == 15 and result.state.method == "sft"
    assert history[-1] < 0.7 * history[0]


@pytest.mark.parametrize("kwargs, match", [
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
])
def test_bad_sft_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**kwargs)
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        SFTConfig.from_dict({"batchsize": 2})


def test_bad_sft_data(make_lm, tokenizer):
    with pytest.raises(ValueError, match="SFT example 1 has no 'response'"):
        train_sft(make_lm(), tokenizer, [DATA[0], {"prompt": "x"}])
    with pytest.raises(ValueError, match="at least one example"):
        train_sft(make_lm(), tokenizer, [])
