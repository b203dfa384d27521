"""Tables fitted to a terminal: which columns give way, how the first column folds, escaping and
bold, checked against layouts written out by hand."""

from paramsurgeon.report.tables import Column, render

LONG = "encoder.layers.11.self_attention.query_key_value.weight"  # 55 characters
RULE = "─"

# name 15 wide, kind 9, shape 8, dtype 5, mean 7, numel 5: 59 with the five gaps of two
STATS = [Column("name"), Column("kind"), Column("shape", True), Column("dtype"), Column("mean", True),
         Column("numel", True)]
STATS_ROWS = [["conv1.weight", "conv", "64x3x7x7", "f32", "1.56e-4", "9,408"],
              ["bn1.running_var", "batchnorm", "64", "f32", "1.00", "64"],
              ["fc.bias", "linear", "1000", "f32", "0", "1,000"]]


def lines(columns, rows, width, color=False, core=None) -> tuple[list[str], list[str]]:
    text, hidden = render(columns, rows, width, color, core)
    assert text.endswith("\n")
    return text[:-1].split("\n"), hidden


def test_a_table_that_fits_keeps_every_column_two_spaces_apart_numbers_right():
    assert lines(STATS, STATS_ROWS, 59) == ([
        "name             kind          shape  dtype     mean  numel",
        RULE * 59,
        "conv1.weight     conv       64x3x7x7  f32    1.56e-4  9,408",
        "bn1.running_var  batchnorm        64  f32       1.00     64",
        "fc.bias          linear         1000  f32          0  1,000",
    ], [])


def test_the_rightmost_columns_give_way_first_and_are_named():
    assert lines(STATS, STATS_ROWS, 58) == ([
        "name             kind          shape  dtype     mean",
        RULE * 52,
        "conv1.weight     conv       64x3x7x7  f32    1.56e-4",
        "bn1.running_var  batchnorm        64  f32       1.00",
        "fc.bias          linear         1000  f32          0",
    ], ["numel"])
    # the names are too short to fold to 24: columns go down to three, past core
    assert lines(STATS, STATS_ROWS, 42, core=5) == ([
        "name             kind          shape",
        RULE * 36,
        "conv1.weight     conv       64x3x7x7",
        "bn1.running_var  batchnorm        64",
        "fc.bias          linear         1000",
    ], ["dtype", "mean", "numel"])


NAMES = [Column("name"), Column("shape", True), Column("dtype"), Column("numel", True)]
NAMES_ROWS = [[LONG, "3072x1024", "bf16", "3,145,728"], ["lm_head.weight", "50304x1024", "bf16", "51,511,296"]]


def test_past_core_columns_give_way_then_the_first_column_folds():
    # natural widths 55 + 10 + 5 + 10 + 6 = 86; at 60 with core 2: numel and dtype go, names fold to 48
    assert lines(NAMES, NAMES_ROWS, 60, core=2) == ([
        "name" + " " * 44 + "       shape",
        RULE * 60,
        "encoder.layers.11.self_attention.query_key_value" + "   3072x1024",
        ".weight",
        "lm_head.weight" + " " * 34 + "  50304x1024",
    ], ["dtype", "numel"])


def test_at_core_the_first_column_folds_rather_than_lose_a_column():
    # core 4: nothing goes, the names fold to 86 - 60 = 26 fewer: 29
    text, hidden = lines(NAMES, NAMES_ROWS, 60, core=4)
    assert hidden == []
    assert text == [
        "name" + " " * 25 + "       shape  dtype       numel",
        RULE * 60,
        "encoder.layers.11.self_attent" + "   3072x1024  bf16    3,145,728",
        "ion.query_key_value.weight",
        "lm_head.weight" + " " * 15 + "  50304x1024  bf16   51,511,296",
    ]


def test_a_fold_below_the_minimum_loses_another_column_instead():
    # at 50, folding all four columns would leave the names 19 < 24: numel goes, and they fold to 31
    text, hidden = lines(NAMES, NAMES_ROWS, 50, core=4)
    assert hidden == ["numel"]
    assert text[:4] == ["name" + " " * 27 + "       shape  dtype", RULE * 50,
                        "encoder.layers.11.self_attentio" + "   3072x1024  bf16", "n.query_key_value.weight"]


def test_with_two_columns_the_first_folds_below_the_minimum():
    text, hidden = lines(NAMES[:2], NAMES_ROWS, 30)
    assert hidden == []
    assert text == ["name" + " " * 14 + "       shape", RULE * 30,
                    "encoder.layers.11." + "   3072x1024", "self_attention.que", "ry_key_value.weigh", "t",
                    "lm_head.weight" + " " * 4 + "  50304x1024"]


def test_a_folded_header_has_the_other_headers_on_its_last_line():
    assert lines([Column("name"), Column("kind")], [["abcdefgh", "conv"]], 8) == (
        ["na", "me  kind", RULE * 8, "ab  conv", "cd", "ef", "gh"], [])


def _names_shown(text: list[str], kept: int) -> list[str]:
    """The first column read back from the rows of fitted lines whose cells have no spaces: a row's
    first line has every kept cell, its continuation lines only the rest of its name."""
    names = []
    for line in text:
        cells = line.split()
        if len(cells) == kept:
            names.append(cells[0])
        else:
            assert len(cells) == 1, line
            names[-1] += cells[0]
    return names


def test_at_every_width_lines_fit_and_every_character_of_every_name_is_shown():
    columns = NAMES + [Column("kind")]
    rows = [row + ["linear"] for row in NAMES_ROWS] + [["x", "1", "f32", "1", "other"]]
    for core in (2, 3, 5):
        for width in range(13, 100):  # the shape column and a one-character fold need 13
            text, hidden = lines(columns, rows, width, core=core)
            assert all(len(line) <= width for line in text), (core, width)
            assert [c.header for c in columns[len(columns) - len(hidden):]] == hidden
            kept = len(columns) - len(hidden)
            rule = next(i for i, line in enumerate(text) if line.startswith(RULE))  # under a folded header
            assert kept >= 2 and text[rule] == RULE * len(text[rule])
            assert text[rule - 1].split()[-1] == columns[kept - 1].header
            assert _names_shown(text[rule + 1:], kept) == [row[0] for row in rows], (core, width)


def test_control_characters_in_names_are_shown_escaped_on_a_terminal_and_in_a_pipe():
    columns, rows = [Column("name"), Column("shape", True)], [["evil\x1b[31m\nname.weight", "3"], ["ok", "4"]]
    shown = "evil\\x1b[31m\\nname.weight"  # 25 characters
    expected = ["name" + " " * 21 + "  shape", RULE * 32, shown + "      3", "ok" + " " * 23 + "      4"]
    assert lines(columns, rows, 80) == (expected, [])
    assert lines(columns, rows, None) == (expected, [])
    text, _ = lines(columns, rows, 80, color=True)
    assert text == ["\x1b[1m" + expected[0] + "\x1b[0m", *expected[1:]]
    # folded, the escaped form is what folds: 14 + 2 + 5 = 21
    assert lines(columns, rows, 21)[0] == ["name" + " " * 10 + "  shape", RULE * 21, "evil\\x1b[31m\\n" + "      3",
                                           "name.weight", "ok" + " " * 12 + "      4"]


def test_the_header_is_bold_only_with_colour_and_nothing_else_is_styled():
    plain, _ = lines(STATS, STATS_ROWS, 58)
    coloured, _ = lines(STATS, STATS_ROWS, 58, color=True)
    assert coloured[0] == "\x1b[1mname             kind          shape  dtype     mean\x1b[0m"
    assert coloured[1:] == plain[1:]
    assert not any("\x1b" in line for line in plain + coloured[1:])
    folded, _ = lines([Column("name"), Column("kind")], [["abcdefgh", "conv"]], 8, color=True)
    assert folded[:3] == ["\x1b[1mna\x1b[0m", "\x1b[1mme  kind\x1b[0m", RULE * 8]


def test_wide_characters_take_two_cells_and_combining_marks_none():
    columns = [Column("name"), Column("shape", True)]
    rows = [["层1.weight", "3"], ["ab.weight", "4"], ["e\u0301e\u0301.weight", "5"]]  # 10 cells, 9 and 9
    assert lines(columns, rows, 80) == (["name        shape", RULE * 17, "层1.weight      3", "ab.weight       4",
                                         "e\u0301e\u0301.weight       5"], [])
    # 14 cells folded to 7: a wide character that would straddle the edge starts the next line
    assert lines(columns, [["文字文字文字ab", "3"]], 14) == (
        ["name     shape", RULE * 14, "文字文       3", "字文字a", "b"], [])


def test_many_rows_that_fit_are_laid_out_as_when_piped():
    columns = [Column("name"), Column("kind"), Column("shape", True), Column("dtype"), Column("numel", True)]
    rows = [[f"layers.{i}.weight", "linear" if i % 3 else "embedding", f"{i % 7 + 1}x16", "f32",
             f"{16 * (i % 7 + 1):,}"] for i in range(20_000)]
    on_terminal, hidden = render(columns, rows, 120, False)
    piped, _ = render(columns, rows, None)
    assert hidden == [] and on_terminal == piped
    assert on_terminal.count("\n") == 20_002
    assert on_terminal.split("\n")[3] == "layers.1.weight      linear      2x16  f32       32"
