"""The README's runnable example runs as written (keeps the front door true)."""
import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    script = tmp_path / "example.py"
    script.write_text(example)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.split()
    ours, oracle = float(printed[-2]), float(printed[-1])
    assert abs(ours - oracle) <= 1e-6 * max(1.0, abs(oracle))


def test_readme_fused_linear_example_runs(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
              if "fused_linear_topk_distill_loss(hidden" in b]
    assert blocks, "the README's fused-linear example is missing"
    script = tmp_path / "fused_example.py"
    script.write_text(blocks[0])
    runpy.run_path(str(script), run_name="__main__")
    fused, unfused = map(float, capsys.readouterr().out.split()[-2:])
    assert abs(fused - unfused) <= 1e-5 * max(1.0, abs(unfused))


def test_readme_one_liners_run_after_the_example(tmp_path, capsys):
    """The "In one line each" block continues the first example (its names); both run as written."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    one_liners = [b for b in blocks if 'support="sampled"' in b and "student_topk" in b]
    assert one_liners, "the README's one-liner block (sampled support, student top-k) is missing"
    script = tmp_path / "one_liners.py"
    script.write_text(blocks[0] + "\n" + one_liners[0])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "tensor(" in printed  # the overlap diagnostics were printed
