"""Every benchmark that writes results takes --out (a folder, default benchmarks/results), so a
run need not overwrite the checked-in results (issue 27.8)."""
import importlib

import pytest

from benchmarks import common

WRITERS = ["benchmarks.bench", "benchmarks.comm", "benchmarks.features",
           "benchmarks.fused_linear", "benchmarks.verl_bench", "benchmarks.repeated_ids",
           "benchmarks.profile", "benchmarks.cuda_bench", "benchmarks.import_time",
           "benchmarks.trl_bench", "benchmarks.trl_accuracy", "tools.sass", "tools.gpu_check"]


@pytest.mark.parametrize("name", WRITERS)
def test_every_results_writer_takes_out(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out, name


def test_features_writes_into_out(tmp_path):
    from benchmarks import features

    features.main(["--n", "8", "--v", "64", "--k", "4", "--reps", "1", "--warmup", "0",
                   "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features_cpu.json", "features_cpu.md"]


def test_write_results_defaults_to_the_results_folder():
    import inspect

    assert inspect.signature(common.write_results).parameters["out_dir"].default == common.RESULTS
