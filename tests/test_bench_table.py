"""scripts/bench.py's jgpt variants (--variant) and its table: ratios against the torch row of
the same window, settings validated before any worker starts."""
import pytest

from scripts import bench


def test_variant_settings_parse_and_fail_by_name():
    assert bench.parse_variant("base") == ("base", {})
    name, settings = bench.parse_variant("v:attn=128,128,8,2/128,64,8,3/64,128,8,3/masked;qkv=32,4")
    assert name == "v" and settings == {"attn": "128,128,8,2/128,64,8,3/64,128,8,3/masked", "qkv": "32,4"}
    assert bench.parse_variant("b:head_out=bf16") == ("b", {"head_out": "bf16"})
    assert bench.parse_variant("c:chunk=16384") == ("c", {"chunk": "16384"})
    assert bench.parse_variant("e:head_exp=fast") == ("e", {"head_exp": "fast"})
    for bad, msg in (("v:foo=1", "attn=..."), ("v:head_out=f16", "f32 or bf16"), ("v:chunk=10000", "divide"), ("v:head_exp=x", "accurate or fast"),
                     ("v:chunk=-8", "divide"), ("v:qkv=3", "rows,warps"), ("v:qkv=48,4", "power of two"),
                     ("v:head=1", "lse_rows"),
                     ("v:attn=a,b,c,d/1,1,1,1/1,1,1,1", "fwd tiles must read 'rows,step,warps,stages'"),
                     (":qkv=32,4", "needs a name")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_variant(bad)


def test_table_ratios_per_variant():
    res = [{"framework": "torch", "version": "t", "device": "GPU", "bf16_peak_tflops": 800.0,
            "rows": {"1": {"ms": 700.0, "peak_gib": 30.0}, "14": {"ms": 800.0, "peak_gib": 30.0}}},
           {"framework": "jgpt", "version": "j", "xla_flags": "--xla_a=1", "variants": [
               {"name": "jgpt", "settings": {}, "rows": {"1": {"ms": 770.0, "peak_gib": 25.0}}},
               {"name": "q32", "settings": {"qkv": "32,4"},
                "rows": {"1": {"ms": 735.0, "peak_gib": 25.0}, "14": {"ms": 720.0, "peak_gib": 25.0}}}]}]
    lines = bench.table(res, 8).splitlines()
    rows = [ln.split(" | ") for ln in lines if ln.startswith("| 1") and "---" not in ln]
    by = {(r[0].strip("| "), r[1]): r for r in rows}
    assert by[("1", "jgpt")][-1].strip(" |") == "1.10x"
    assert by[("1", "jgpt [q32]")][-1].strip(" |") == "1.05x"
    assert by[("14", "jgpt [q32]")][-1].strip(" |") == "0.90x"
    assert ("14", "jgpt") not in by  # no row for a window the variant did not time
    assert by[("1", "torch")][-1].strip(" |") == ""
    assert lines[-3:-1] == ["q32: qkv=32,4", "jgpt XLA_FLAGS: --xla_a=1"] and "peak so far" in lines[-1]


def test_workers_get_their_own_environment(tmp_path, monkeypatch):
    """run_workers gives one framework's worker extra environment variables (bench.py --xla_flags:
    XLA_FLAGS for the jgpt worker alone) and collects each worker's RESULT line."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    script = tmp_path / "worker.py"
    script.write_text("import json, os, sys\n"
                      "print('RESULT ' + json.dumps({'framework': sys.argv[2], 'flags': os.environ.get('XLA_FLAGS')}))\n")
    res = bench.run_workers(str(script), ["torch", "jgpt"], [], None, {"jgpt": {"XLA_FLAGS": "--xla_x=1"}})
    assert [(r["framework"], r["flags"]) for r in res] == [("torch", None), ("jgpt", "--xla_x=1")]
