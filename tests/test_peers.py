"""benchmarks/peers.py: finding the peers, running their scripts, reading their figures.

The peers themselves (torch, FBGEMM, TorchRec) are not installed for the
tests: a fake peer directory holds scripts that print what the real ones
print, so the wiring (subprocess, parsing, failure messages) is what runs.
"""

import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import peers  # noqa: E402

EBC_OUT = """\
torch 2.13.0+cpu fbgemm_gpu 1.8.0 torchrec 1.8.0 threads=2
T=2 rows=1000 D=8 B=64 L~3.00 alpha=1.05 seed=0 unique ids/table/batch~100 of 192; datagen 0.0s
  fbgemm TBE fwd                                         0.2 ms

variant                                             median ms   min ms   samples/s  Mlookups/s
torchrec FusedEBC fwd+bwd+RowWiseAdagrad (fused)          1.0      0.9       61917        0.37
fbgemm TBE fwd                                           19.5     19.2      393304        2.36
fbgemm TBE fwd+bwd+SGD (fused)                            0.4      0.3      165764        0.99
fbgemm TBE fwd+bwd+RowWiseAdagrad (fused)                48.25    47.0      144200        0.87
"""

DMP_OUT = """\
[rank0] plan (0.81s): table_wise/fused: 26 tables; DMP init 1.20s
[rank0] nproc=2 T=26 rows=100000 D=64 L=10 B/rank=4096 threads/proc=1: median step 470.3 ms \
(max over ranks), min 455.0 ms, global 17418 samples/s; loss 0.693 0.690
"""


def test_parses_what_the_peers_print():
    ms = peers.parse_ebc_bench(EBC_OUT)
    assert ms[peers.TBE_FWD] == 19.5 and ms[peers.TBE_STEP] == 48.25
    assert ms[peers.TORCHREC_STEP] == 1.0 and len(ms) == 4
    d = peers.parse_dmp_dlrm(DMP_OUT)
    assert d == {"step_time_ms_median": 470.3, "examples_per_sec": 17418.0,
                 "plan": "table_wise/fused: 26 tables"}
    with pytest.raises(RuntimeError, match="no summary table"):
        peers.parse_ebc_bench("Traceback ...")
    with pytest.raises(RuntimeError, match="no step time"):
        peers.parse_dmp_dlrm("[rank0] plan")


def test_missing_peer_says_why(tmp_path):
    peer, why = peers.find(None, None)
    assert peer is None and "JDMT_PEER" in why
    peer, why = peers.find(str(tmp_path / "nope"), sys.executable)
    assert peer is None and "not a directory" in why
    peer, why = peers.find(str(tmp_path), str(tmp_path / "python"))
    assert peer is None and "does not exist" in why
    assert peers.describe(None, why) == {"available": False, "reason": why}


def test_runs_a_peer_script_and_reports_its_failure(tmp_path):
    (tmp_path / "ebc_bench.py").write_text(textwrap.dedent(f"""\
        import sys
        assert "--only" in sys.argv
        print({EBC_OUT!r})
        """))
    (tmp_path / "dmp_dlrm.py").write_text("import sys; print('boom', file=sys.stderr); sys.exit(3)")
    peer, why = peers.find(str(tmp_path), sys.executable)
    assert why == "" and peer.scripts == str(tmp_path)
    out = peers.ebc_bench(peer, tables=2, rows=1000, dim=8, batch=64, pooling=3, alpha=1.05,
                          iters=3, variants=(peers.TBE_FWD, peers.TBE_STEP))
    assert out["ms"] == {peers.TBE_FWD: 19.5, peers.TBE_STEP: 48.25}
    with pytest.raises(RuntimeError, match="printed no figure"):
        peers.ebc_bench(peer, tables=2, rows=1000, dim=8, batch=64, pooling=3, alpha=1.05,
                        iters=3, variants=("TBE fwd+bwd+Adam",))
    with pytest.raises(RuntimeError, match="status 3: boom"):
        peer.run("dmp_dlrm.py", [], timeout=60)


def test_a_peer_run_that_dies_once_is_run_again(tmp_path):
    """TorchRec's gloo ranks now and then abort at random: one retry, counted."""
    mark = tmp_path / "ran"
    (tmp_path / "flaky.py").write_text(textwrap.dedent(f"""\
        import os, sys
        if not os.path.exists({str(mark)!r}):
            open({str(mark)!r}, "w").close()
            sys.exit(134)
        print("ok")
        """))
    peer, _ = peers.find(str(tmp_path), sys.executable)
    assert peer.run("flaky.py", [], timeout=60).strip() == "ok"
    assert peer.retries == 1 and peers.describe(peer, "")["retries"] == 1
    (tmp_path / "dead.py").write_text("import sys; sys.exit(134)")
    with pytest.raises(RuntimeError, match="status 134"):
        peer.run("dead.py", [], timeout=60)
    assert peer.retries == 2
