"""`mechsieve methods`: every registered method listed, one method's settings with their types,
defaults and docstrings, an unknown name refused with a suggestion; the field docstrings it reads."""

import dataclasses

from mechsieve.cli import main


def test_the_listing_has_every_registered_method_on_one_line(capsys):
    from mechsieve.commands.methods import WIDTH
    from mechsieve.scorers.registry import available

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == available() and len(listed) == 14
    assert all(len(line) <= WIDTH for line in lines)
    ifd = next(line for line in lines if line.split()[0] == "ifd")
    assert "IFD (Cherry LLM, Li et al. NAACL 2024): exp(mean NLL of y given x" in ifd


def test_a_method_registered_at_run_time_is_listed(capsys):
    from mechsieve.scorers.baselines import RandomScorer
    from mechsieve.scorers.registry import register, unregister

    class Coin(RandomScorer):
        """Heads or tails, for the test."""

    register("coin-test", Coin)
    try:
        assert main(["methods"]) == 0
        assert any(line.split()[:2] == ["coin-test", "Heads"] for line in capsys.readouterr().out.splitlines())
    finally:
        unregister("coin-test")


def test_nait_shows_its_fields_with_type_default_and_docstring(capsys):
    assert main(["methods", "nait"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "nait: NAIT (ICLR 2026, arXiv 2603.13201); see the module docstring for the presets and differences."
    assert "reads the model (--model) and a target pool (--target)" in lines[1]
    i = lines.index("  layers: list[int] | Literal['all'] = 'all'")
    assert lines[i + 1].strip() == "Blocks to use (negative counts from the end), or `all`; with layer_select=auc, the candidates."
    i = lines.index("  site: Literal['resid', 'mlp'] = 'resid'")
    assert lines[i + 1].strip().startswith("`resid`: residual stream after each block;")
    # nested sections (from the shared base config) with dotted keys, as --set takes them
    assert "  render: RenderConfig (section)" in lines
    i = lines.index("  render.max_len: int = 512")
    assert lines[i + 1].strip() == "Longest sequence kept; longer ones are cut at the end and counted as truncated."
    assert "  max_tokens: int = 2048" in lines


def test_a_method_without_settings_says_so(capsys):
    assert main(["methods", "random"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("random: Random selection (seeded).") and "settings: none" in out


def test_an_unknown_method_exits_2_with_the_close_match(capsys):
    assert main(["methods", "nat"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("mechsieve methods: error: unknown method 'nat'; available: concept-influence, ")
    assert captured.err.rstrip().endswith("did you mean nait?")


@dataclasses.dataclass
class _Inner:
    """Nested."""

    depth: int = 3
    """How deep."""


@dataclasses.dataclass
class _Base:
    name: str = "x"
    """The name,
    over two lines."""
    bare: int = 0


@dataclasses.dataclass
class _Child(_Base):
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    """The inner section."""
    items: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    """Some items."""
    needed: float = dataclasses.field(kw_only=True)


def test_field_docs_and_describe_settings_read_the_class_body():
    from mechsieve.config import describe_settings, field_docs

    assert field_docs(_Child) == {"name": "The name,\nover two lines.", "inner": "The inner section.",
                                  "items": "Some items."}
    rows = {s.key: s for s in describe_settings(_Child)}
    assert list(rows) == ["name", "bare", "inner", "inner.depth", "items", "needed"]
    assert rows["inner"].section and rows["inner"].type == "_Inner"
    assert (rows["inner.depth"].type, rows["inner.depth"].default, rows["inner.depth"].doc) == ("int", 3, "How deep.")
    assert rows["items"].default == [1, 2] and rows["bare"].doc == ""
    assert rows["needed"].default is dataclasses.MISSING


def test_every_registered_config_describes_itself():
    from mechsieve.config import describe_settings
    from mechsieve.scorers.registry import available, get_scorer_class

    for name in available():
        cls = get_scorer_class(name).config_cls
        settings = describe_settings(cls)
        undocumented = [s.key for s in settings if not s.doc]
        assert not undocumented, f"{name}: fields without a docstring: {undocumented}"
