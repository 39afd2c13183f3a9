"""relibra's CPU platform (relibra_verl.patches.cpu_platform): the parts that can be checked without the
end-to-end stack (mbridge and vLLM are not in the test environment; `make e2e` runs the rest)."""
import subprocess
import sys

from relibra_verl.patches.cpu_platform import NAME, local_to_te_name


def test_local_spec_names_map_to_transformer_engine_layout():
    S, rank = 4, 1
    assert local_to_te_name("decoder.layers.3.input_layernorm.weight", S, rank) == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert local_to_te_name("decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight", S, rank) == \
        "decoder.layers.0.mlp.experts.linear_fc1.weight6"
    assert local_to_te_name("decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight", S, 0) == \
        "decoder.layers.0.mlp.experts.linear_fc2.weight2"
    for same in ("decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.router.weight",
                 "decoder.layers.1.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight"):
        assert local_to_te_name(same, S, rank) == same


def _installed_finders(env_platform: str) -> str:
    code = ("import os, sys; os.environ['VERL_PLATFORM'] = sys.argv[1]; "
            "import relibra_verl.patches.cpu_platform as p; "
            "print(sum(type(f).__name__ == 'AfterImport' for f in sys.meta_path), p.install())")
    return subprocess.run([sys.executable, "-c", code, env_platform], capture_output=True, text=True,
                          timeout=120, check=True).stdout.split()


def test_platform_is_inert_unless_selected():
    assert _installed_finders("cuda") == ["0", "False"]
    assert _installed_finders(NAME) == ["1", "True"]
