"""benchmarks/gpu_wheels.py: the wheels a GPU machine without network needs are the dependency closure of what it
lacks, less what torch/transformers/timm already bring there."""
from benchmarks import gpu_wheels as W

# A hand-made metadata world: diffusers needs importlib_metadata, which needs zipp and (since 10.x, for Pythons below
# 3.15) lazy-importer, the package the hand-kept list missed; filelock comes with torch on the GPU machine.
FAKE = {
    "diffusers": ["importlib_metadata", "filelock", "huggingface-hub>=1.32", "numpy",
                  'pytest; extra == "test"'],
    "importlib-metadata": ["zipp>=3.20", 'lazy-importer>=0.1; python_version < "3.15"'],
    "zipp": [], "lazy-importer": [], "filelock": [], "numpy": [], "huggingface-hub": ["filelock", "tqdm"], "tqdm": [],
    "omegaconf": ["PyYAML>=5.1.0", 'dataclasses; python_version < "3.7"'], "pyyaml": [],
    "av": [], "ftfy": ["wcwidth"], "wcwidth": [],
    "open-clip-torch": ["torch>=2.0", "torchvision", "regex", "ftfy", "timm>=1.0.17"],
    "torch": ["filelock", "numpy", "sympy"], "sympy": [], "torchvision": ["torch", "numpy", "pillow"], "pillow": [],
    "transformers": ["huggingface-hub", "numpy", "pyyaml", "regex", "tqdm"], "regex": [],
    "timm": ["torch", "torchvision", "pyyaml", "huggingface-hub"],
}


def fake_requires(name):
    return FAKE.get(name)


def test_closure_follows_markers_for_the_target_python_and_skips_extras():
    env = W.target_environment("3.12")
    assert W.closure(["importlib_metadata"], fake_requires, env) == {"importlib-metadata", "zipp", "lazy-importer"}
    assert W.closure(["importlib_metadata"], fake_requires, W.target_environment("3.15")) == {
        "importlib-metadata", "zipp"}
    assert "pytest" not in W.closure(["diffusers"], fake_requires, env)       # an extra's requirement
    assert "dataclasses" not in W.closure(["omegaconf"], fake_requires, env)  # a marker false on 3.12
    assert W.closure(["Open_Clip.Torch"], fake_requires, env) >= {"open-clip-torch", "ftfy", "wcwidth", "torch"}


def test_to_fetch_is_what_the_needed_packages_bring_beyond_the_gpu_machine():
    got = W.to_fetch(fake_requires, W.target_environment("3.12"))
    # pyyaml, regex, filelock, numpy, huggingface-hub, tqdm, torch, torchvision, timm: already there with
    # transformers, torch and timm; lazy-importer and zipp: needed, not there
    assert got == ["av", "diffusers", "ftfy", "importlib-metadata", "lazy-importer", "omegaconf", "open-clip-torch",
                   "wcwidth", "zipp"]


def test_the_installed_closure_is_pinned_and_closed(capsys):
    """On this machine: every entry is pinned to the installed version, and every requirement of an entry (for
    Python 3.12) is itself an entry or comes with the packages the GPU machine has."""
    assert W.main([]) == 0
    lines = capsys.readouterr().out.split()
    names = {W.canonical(line.split("==")[0]) for line in lines}
    assert all("==" in line for line in lines) and {"diffusers", "omegaconf", "av", "ftfy"} <= names
    env = W.target_environment("3.12")
    there = W.closure(W.THERE, W.installed_requires, env)
    for name in names:
        assert W.closure([name], W.installed_requires, env) <= names | there, name
