import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_tour_runs_as_pasted(env_kwargs, resources, capsys):
    """The README's quick tour, run as written except for the dataset (tiny synthetic data here)."""
    text = README.read_text()
    tour = text.split("## A quick tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    assert 'gym.make("DeepRec-v0")' in code
    code = code.replace('gym.make("DeepRec-v0")', 'gym.make("DeepRec-v0", **KW)')
    scope = {"KW": env_kwargs}
    exec(compile(code, "README quick tour", "exec"), scope)
    info = scope["info"]
    assert scope["terminated"] and info["format_errors"] == [] and info["is_action_valid"]
    assert len(info["answer_ids"]) == 10 and None not in info["answer_ids"]


def test_readme_is_short_and_links_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (README.parent / link).is_file(), link
