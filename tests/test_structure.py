"""The shape of the house: imports go one way, floor by floor, and only at the top of a file."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A module may import modules on lower floors only (and nothing of ours inside a function).
FLOORS = [("data",), ("model", "rewards", "prompt"), ("grpo", "distill", "selector", "metrics"), ("config",),
          ("eval", "synth"), ("probe",), ("train",), ("bench_rl", "bench_rewards", "experiment")]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def imports(name):
    """(top-level imports of our modules, imports of our modules inside functions) of name.py."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found = {node.module.split(".")[0]}
        else:
            continue
        found &= set(FLOOR)
        (top if node.col_offset == 0 else nested).update(found)
    return top, nested


def test_every_module_of_ours_has_a_floor():
    ours = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert ours == set(FLOOR), ours ^ set(FLOOR)


def test_imports_only_go_down_and_only_at_the_top():
    for name in FLOOR:
        top, nested = imports(name)
        assert not nested, f"{name}.py imports {sorted(nested)} inside a function"
        up = [m for m in top if FLOOR[m] >= FLOOR[name]]
        assert not up, f"{name}.py imports {up}, on its own floor or above"


def test_libraries_do_not_parse_arguments_or_write_checkpoints():
    for name in ("grpo", "distill", "selector", "metrics"):
        source = open(os.path.join(ROOT, f"{name}.py")).read()
        for word in ("argparse", "sys.argv", "save_checkpoint", "save_pretrained", "torch.save"):
            assert word not in source, f"{name}.py uses {word}"
