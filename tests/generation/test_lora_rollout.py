"""PEFT LoRA policies roll out on the static runner: same tokens and log-probs as the eager PEFT model."""

import copy
import warnings

import pytest
import torch

from rftengine.generation import EagerFallbackWarning, Generator
from tests.generation.test_generator import (
    PROMPTS, common_prefix_until_near_tie, hf_greedy, llama, qwen2, trainer_logprobs,
)

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {"llama": llama, "qwen2": qwen2}
GREEDY = dict(max_new_tokens=10, top_k=1, eos_token_ids=None)


def lora_model(factory, seed: int = 0, **config):
    """``(peft model, untouched copy of its base)``; B is random so the adapters change the outputs."""
    torch.manual_seed(seed)
    base = factory()
    reference = copy.deepcopy(base)
    options = dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=ALL_LINEAR, init_lora_weights=False)
    model = peft.get_peft_model(base, peft.LoraConfig(**(options | config)))
    return model.eval(), reference


def static_generator(model, **kwargs) -> Generator:
    with warnings.catch_warnings():
        warnings.simplefilter("error", EagerFallbackWarning)
        gen = Generator(model, max_batch_size=8, max_seq_len=32, **kwargs)
    assert gen.backend == "static"
    return gen


def assert_equals_eager_peft(model, gen: Generator, seed: int = 0):
    """Greedy tokens equal PEFT's own generate; sampled log-probs equal PEFT's full forward."""
    greedy = gen.generate(PROMPTS, **GREEDY)
    assert torch.equal(greedy.sequences, hf_greedy(model, greedy, GREEDY["max_new_tokens"]))
    sampled = gen.generate(PROMPTS, num_samples=2, max_new_tokens=8, temperature=0.9, eos_token_ids=None, seed=seed)
    torch.testing.assert_close(sampled.logprobs, trainer_logprobs(model, sampled, 0.9), rtol=0, atol=1e-5)
    return greedy


@pytest.mark.parametrize("family,config", [
    ("llama", dict(use_rslora=True)),  # scale alpha / sqrt(r)
    ("qwen2", dict()),  # scale alpha / r; Qwen2's q/k/v carry biases
])
def test_lora_rollout_equals_eager_peft(family, config):
    model, base = lora_model(FAMILIES[family], **config)
    gen = static_generator(model)
    greedy = assert_equals_eager_peft(model, gen)
    # the adapters matter: without them the rollout would be another one
    assert not torch.equal(greedy.sequences, hf_greedy(base, greedy, GREEDY["max_new_tokens"]))


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # peft: then it cannot merge; we never do
def test_optimizer_step_on_adapters_reaches_the_next_rollout():
    # lora_bias: lora_B has a bias too; zero at init, trained by the step
    model, _ = lora_model(qwen2, seed=1, lora_bias=True)
    gen = static_generator(model)
    before = assert_equals_eager_peft(model, gen)

    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trained, lr=5.0)
    model(before.sequences).logits.float().logsumexp(-1).mean().backward()
    opt.step()
    # the LoRA reference pass in the methods: the same model with its adapters disabled
    with model.disable_adapter(), torch.no_grad():
        model(before.sequences)

    after = assert_equals_eager_peft(model, gen, seed=1)
    assert not torch.equal(before.sequences, after.sequences)


def test_disabled_adapters_roll_out_the_base_model():
    model, base = lora_model(llama)
    gen = static_generator(model)
    with_adapters = gen.generate(PROMPTS, **GREEDY)
    with model.disable_adapter():
        without = gen.generate(PROMPTS, **GREEDY)
    assert torch.equal(without.sequences, hf_greedy(base, without, GREEDY["max_new_tokens"]))
    assert torch.equal(gen.generate(PROMPTS, **GREEDY).sequences, with_adapters.sequences)


def test_only_the_active_adapter_is_applied():
    model, _ = lora_model(qwen2)
    torch.manual_seed(7)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                               init_lora_weights=False))
    gen = static_generator(model)
    first = assert_equals_eager_peft(model, gen)  # "default" is active, "other" only loaded
    model.set_adapter("other")
    second = assert_equals_eager_peft(model, gen)
    assert not torch.equal(first.sequences, second.sequences)


def test_fp32_adapters_on_a_bf16_base_cast_only_the_adapters():
    torch.manual_seed(0)
    base = qwen2().to(torch.bfloat16)
    # peft keeps adapters in fp32 on a bf16 base (autocast_adapter_dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                                                      init_lora_weights=False)).eval()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.dtype == torch.float32
    gen = static_generator(model)
    gen.generate(PROMPTS, **GREEDY)
    q = gen._weights.layers[0].q
    assert q.weight is q_proj.base_layer.weight  # the base is read in place, not copied
    assert q.lora.a.dtype == torch.bfloat16
    with torch.no_grad():
        q_proj.lora_A["default"].weight.mul_(-2.0)
    gen.generate(PROMPTS, **GREEDY)
    assert gen._weights.layers[0].q.lora.a is q.lora.a  # refreshed in place: graphs keep their pointers
    assert torch.equal(q.lora.a, q_proj.lora_A["default"].weight.to(torch.bfloat16))


def _two_active(model):
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])


@pytest.mark.parametrize("config,setup,match", [
    (dict(use_dora=True), None, "DoRA"),
    (dict(target_modules=ALL_LINEAR + ["lm_head"]), None, "lm_head"),
    (dict(target_modules=["embed_tokens", "q_proj"]), None, "embed_tokens"),
    (dict(), _two_active, "2 active adapters"),
])
def test_unsupported_adapters_fall_back_with_a_warning(config, setup, match):
    model, _ = lora_model(llama, **config)
    if setup is not None:
        setup(model)
    with pytest.warns(EagerFallbackWarning, match=match):
        gen = Generator(model, max_batch_size=8, max_seq_len=32)
    assert gen.backend == "eager-hf"
    out = gen.generate(PROMPTS, max_new_tokens=4, top_k=1, eos_token_ids=None)
    assert torch.equal(out.sequences, hf_greedy(model, out, 4))


@pytest.mark.cuda
def test_cuda_graphs_lora_rollout_follows_adapter_updates():
    model, _ = lora_model(qwen2)
    model = model.to("cuda")
    graphs = static_generator(model)
    eager = Generator(model, max_batch_size=8, max_seq_len=32, cuda_graphs=False)
    kwargs = dict(max_new_tokens=20, top_k=1, eos_token_ids=None)
    a = graphs.generate(PROMPTS, **kwargs)
    captured = graphs.num_graphs
    assert captured >= 1
    common_prefix_until_near_tie(model, eager.generate(PROMPTS, **kwargs), a.responses)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    model(a.sequences).logits.float().logsumexp(-1).mean().backward()
    opt.step()
    with model.disable_adapter(), torch.no_grad():  # the reference pass between rollouts
        model(a.sequences)
    b = graphs.generate(PROMPTS, **kwargs)
    assert graphs.num_graphs == captured  # replayed over the updated adapters, not recaptured
    assert not torch.equal(a.sequences, b.sequences)
    same = common_prefix_until_near_tie(model, eager.generate(PROMPTS, **kwargs), b.responses)
    torch.testing.assert_close(b.logprobs[same], trainer_logprobs(model, b, 1.0)[same], rtol=0, atol=1e-4)
