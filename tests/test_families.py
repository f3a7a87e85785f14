"""Each model family against Hugging Face transformers: tiny random models saved as Hugging
Face directories, loaded as they are and converted."""

import pytest
import torch

from checkpoint import convert_hf, expected_shapes, load_checkpoint, resolve_checkpoint
from engine import LLM, setup_caches
from kivi_cache import CacheConfig, PackedPrompts
from model import ModelArgs, Transformer, build_model, windowed_attention
from planner import weight_bytes
from test_checkpoint import write_tiny_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

VOCAB, WINDOW = 256, 8
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128, rope_theta=20000.0)
LLAMA_LIKE = dict(COMMON, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {  # name: (config, saved in shards)
    "llama": (lambda: transformers.LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=False), True),
    "mistral-window": (lambda: transformers.MistralConfig(**LLAMA_LIKE, sliding_window=WINDOW), False),
    "qwen2-tied": (lambda: transformers.Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=True), False),
    "qwen3": (lambda: transformers.Qwen3Config(**LLAMA_LIKE, head_dim=32, tie_word_embeddings=False), False),
    "falcon-mqa": (lambda: transformers.FalconConfig(**COMMON, hidden_size=64, num_attention_heads=4, multi_query=True,
                                                     new_decoder_architecture=False), False),
    "falcon-new-decoder": (lambda: transformers.FalconConfig(**COMMON, hidden_size=128, num_attention_heads=8, num_kv_heads=2,
                                                             new_decoder_architecture=True), True),
}


@pytest.fixture(scope="module")
def hf_family(tmp_path_factory):
    """name -> (Hugging Face directory, the transformers model), built once: random weights
    of about unit logits, norm weights and biases random too."""
    built = {}

    def get(name: str):
        if name not in built:
            make_config, sharded = FAMILIES[name]
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
            with torch.no_grad():
                for param_name, p in hf.named_parameters():
                    if p.ndim == 2:
                        p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
                    else:
                        p.copy_(torch.randn_like(p) * 0.1 + (0.0 if param_name.endswith("bias") else 1.0))
            path = tmp_path_factory.mktemp(name) / "hf"
            hf.save_pretrained(path, max_shard_size="100KB" if sharded else "50GB")
            assert (len(list(path.glob("model*.safetensors"))) > 1) == sharded
            write_tiny_tokenizer(path)
            built[name] = path, hf
        return built[name]

    return get


def engine_model(path) -> Transformer:
    args, state_dict = load_checkpoint(resolve_checkpoint(str(path)), "cpu", torch.float32)
    return build_model(args, state_dict, torch.device("cpu"), torch.float32)


def full_forward(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_at_every_position(hf_family, name):
    path, hf = hf_family(name)
    tokens = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()  # 5 windows
    ours = full_forward(engine_model(path), tokens)
    with torch.inference_mode():
        theirs = hf(torch.tensor([tokens])).logits[0].float()
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("name", ["llama", "qwen2-tied"])
def test_cpu_float32_matrices_with_as_many_outputs_as_inputs_are_column_major(hf_family, name):
    path, _ = hf_family(name)
    args, state_dict = load_checkpoint(resolve_checkpoint(str(path)), "cpu", torch.float32)
    model = build_model(args, dict(state_dict), torch.device("cpu"), torch.float32)
    params = dict(model.named_parameters())
    matrices = [n for n, p in params.items() if p.ndim == 2]
    assert "feed_forward.w2" in " ".join(matrices) and ("output.weight" in params) == (name == "llama")
    for n in matrices:
        weight = params[n]
        wide = weight.shape[0] >= weight.shape[1] and not (n == "tok_embeddings.weight" and "output.weight" in params)
        assert weight.T.is_contiguous() if wide else weight.is_contiguous(), n
        assert torch.equal(weight, state_dict[n]), n
    bf16 = build_model(args, dict(state_dict), torch.device("cpu"), torch.bfloat16)
    assert all(p.is_contiguous() for p in bf16.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_loading_the_directory_equals_converting_it_first(hf_family, name, tmp_path):
    path, _ = hf_family(name)
    convert_hf(path, tmp_path / "converted")
    direct, converted = load_checkpoint(path, "cpu", torch.float32), load_checkpoint(tmp_path / "converted", "cpu", torch.float32)
    assert direct[0] == converted[0]
    assert direct[1].keys() == converted[1].keys() and all(torch.equal(direct[1][k], converted[1][k]) for k in direct[1])
    tokens = list(range(3, 30))
    assert torch.equal(full_forward(engine_model(path), tokens), full_forward(engine_model(tmp_path / "converted"), tokens))


PROMPTS = [[7, 1, 99, 42, 5], [3, 250, 17, 64, 8, 120, 33, 2, 91, 11, 200, 5, 6, 7, 8, 9, 10, 44, 45]]  # 5 and 19 > WINDOW


def greedy_and_full_forward(model, cache: CacheConfig) -> list[tuple[list[int], torch.Tensor]]:
    """(16 greedy tokens of each prompt through `cache`, the full forward's logits that chose them)."""
    out = LLM.from_model(model, cache=cache).generate([{"prompt": p} for p in PROMPTS], max_new_tokens=16, temperature=0)
    return [(c.token_ids, full_forward(model, prompt + c.token_ids)[len(prompt) - 1 : -1]) for prompt, c in zip(PROMPTS, out)]


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_decode_through_the_fp_cache_equals_full_forward_argmax(hf_family, name):
    """Every token decoded through the cache (past the window for the windowed model) is the
    full forward's argmax."""
    model = engine_model(hf_family(name)[0])
    for new, logits in greedy_and_full_forward(model, CacheConfig("fp16")):
        assert new == logits.argmax(-1).tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_decode_through_kivi2_with_flushes(hf_family, name):
    """kivi2 with G 8, R 16: the 19-token prompt and its tokens flush groups into 2-bit codes.
    The codes move these tiny random models' logits by up to ~0.9, so each token must be
    within 1.0 of the full forward's best (the argmax wherever it leads by more than that);
    a wrong layer in the decode path picks tokens 2-3 below it."""
    model = engine_model(hf_family(name)[0])
    for new, logits in greedy_and_full_forward(model, CacheConfig("kivi2", group_size=8, residual_len=16)):
        chosen = logits.gather(1, torch.tensor(new)[:, None])[:, 0]
        assert (logits.max(-1).values - chosen).max().item() < 1.0


@pytest.mark.parametrize("T, window", [(600, 100), (600, 300), (100, 99)])
def test_windowed_attention_in_chunks_equals_the_dense_mask(T, window):
    q, k, v = torch.randn(3, 1, 2, T, 16, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T)
    behind = pos[:, None] - pos[None]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(behind >= 0) & (behind < window))
    torch.testing.assert_close(windowed_attention(q, k, v, window), dense, rtol=1e-5, atol=1e-5)


def test_windowed_packed_prefill_equals_full_forward(hf_family):
    model = engine_model(hf_family("mistral-window")[0])
    assert model.args.sliding_window == WINDOW and all(layer.attention.sliding_window == WINDOW for layer in model.layers)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in (3 * WINDOW + 1, WINDOW - 5, 2 * WINDOW)]
    setup_caches(model, CacheConfig("fp16"), 3, 3 * WINDOW + 1)
    with torch.inference_mode():
        last = model(torch.cat(prompts, 1), prompts=PackedPrompts([1, 0, 2], [p.shape[1] for p in prompts], "cpu"),
                     last_only=True)[0]
        full = torch.cat([model(p)[:, -1] for p in prompts])
    assert (last - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_expected_shapes_and_weight_bytes_cover_every_tensor(hf_family, name):
    path, _ = hf_family(name)
    args = ModelArgs.load(path / "config.json")
    with torch.device("meta"):
        model = Transformer(args)
    assert expected_shapes(args) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert weight_bytes(args, torch.bfloat16) == 2 * sum(p.numel() for p in model.parameters())


REAL_CONFIGS = {  # from the models' config.json, the keys that matter here
    "falcon-7b": dict(model_type="falcon", hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, vocab_size=65024,
                      multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False, alibi=False,
                      layer_norm_epsilon=1e-5),
    "falcon-40b": dict(model_type="falcon", hidden_size=8192, num_hidden_layers=60, num_attention_heads=128, num_kv_heads=8,
                       vocab_size=65024, new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=131072,
                       use_sliding_window=False, max_window_layers=28, tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     max_position_embeddings=40960, sliding_window=None, use_sliding_window=False, max_window_layers=36,
                     tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_named_configs_equal_the_real_models_configs(name):
    assert ModelArgs.from_hf_config(REAL_CONFIGS[name]) == ModelArgs.from_name(name)


@pytest.mark.parametrize("extra, window", [
    (dict(use_sliding_window=False, max_window_layers=0), 0),
    (dict(use_sliding_window=True, max_window_layers=0), 4096),
    (dict(use_sliding_window=True, max_window_layers=28), 0),
    (dict(use_sliding_window=True, layer_types=["sliding_attention"] * 28), 4096),
])
def test_qwen_sliding_window_on_all_layers_or_none(extra, window):
    config = {**REAL_CONFIGS["qwen2.5-7b"], "sliding_window": 4096, **extra}
    assert ModelArgs.from_hf_config(config).sliding_window == window


def test_qwen_sliding_window_on_some_layers_is_refused():
    config = {**REAL_CONFIGS["qwen2.5-7b"], "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 20}
    with pytest.raises(ValueError, match="sliding window on 8 of 28 layers"):
        ModelArgs.from_hf_config(config)


@pytest.mark.parametrize("rope", [{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                                  {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}])
def test_unknown_rope_type_is_one_clear_error(rope):
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn': supported are default, linear, dynamic, llama3"):
        ModelArgs.from_hf_config({**REAL_CONFIGS["qwen2.5-7b"], **rope})



@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "falcon-mqa"])
def test_tensor_parallel_shards_of_the_directory_equal_those_of_its_conversion(hf_family, name, tmp_path):
    """Each of 2 ranks reads the same slices from the Hugging Face directory as from the
    engine's own format (tests/test_tp.py checks those against the full tensors)."""
    path, _ = hf_family(name)
    convert_hf(path, tmp_path / "converted")
    for rank in range(2):
        direct = load_checkpoint(path, "cpu", torch.float32, rank, 2)[1]
        converted = load_checkpoint(tmp_path / "converted", "cpu", torch.float32, rank, 2)[1]
        assert direct.keys() == converted.keys() and all(torch.equal(direct[k], converted[k]) for k in direct)


def test_tensor_parallel_load_of_multi_query_falcon_on_two_ranks_is_refused(hf_family):
    with pytest.raises(ValueError, match="2 ranks do not divide the model's kv heads 1"):
        load_checkpoint(hf_family("falcon-mqa")[0], "cpu", torch.float32, 0, 2)
