"""critical_weights.domains.groups and the grouped text reader: each group's in-sample and
held-out texts drawn with the seed, too-small groups left out with the reason, and a field
that cannot group the texts refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from critical_weights.config.params import DomainsParams
from critical_weights.core.errors import ParamsError, TextsError
from critical_weights.domains import groups
from critical_weights.texts.sources import read_grouped


def _tokens(text: str) -> list[int]:
    return [sum(map(ord, w)) for w in text.split()]


def _pairs(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"text {g} number {i} " + "word " * (i % 5), g) for g, n in counts.items() for i in range(n)]


def test_each_group_gets_its_in_sample_then_held_out_texts_the_same_for_the_same_seed():
    dp = DomainsParams(n_in_sample=3, n_heldout=2)
    shown, left_out = groups.draw(_pairs({"a": 6, "b": 5, "c": 4}), dp, 42, 256, _tokens)
    assert [g.name for g in shown] == ["a", "b"] and list(left_out) == ["c"]
    assert "4 usable texts; a group needs domains.n_in_sample + domains.n_heldout = 3 + 2 = 5" in left_out["c"]
    for g in shown:
        assert len(g.in_sample) == 3 and len(g.heldout) == 2
        assert not {tuple(s) for s in g.in_sample} & {tuple(s) for s in g.heldout}
    again, _ = groups.draw(_pairs({"a": 6, "b": 5, "c": 4}), dp, 42, 256, _tokens)
    assert again == shown
    other, _ = groups.draw(_pairs({"a": 6, "b": 5, "c": 4}), dp, 7, 256, _tokens)
    assert other[0].in_sample != shown[0].in_sample or other[0].heldout != shown[0].heldout


def test_a_group_named_whole_is_refused():
    with pytest.raises(ParamsError, match="domains.field: a group is named 'whole'"):
        groups.draw(_pairs({"whole": 6, "b": 6}), DomainsParams(n_in_sample=3, n_heldout=2), 42, 256, _tokens)


@pytest.mark.parametrize("counts, message", [
    ({"x": 6}, "domains.field: every text has domain = 'x', so there is one group"),
    ({f"t{i}": 1 for i in range(5)}, "domains.field: 'domain' gives each of the 5 texts a group of its own"),
    ({"a": 6, "b": 2}, r"domains: 1 group\(s\) have the 5 texts a group needs"),
])
def test_a_field_that_cannot_group_is_one_line(counts, message):
    with pytest.raises(ParamsError, match=message) as caught:
        groups.draw(_pairs(counts), DomainsParams(n_in_sample=3, n_heldout=2), 42, 256, _tokens)
    assert "\n" not in str(caught.value).strip()


def test_the_grouped_reader_takes_a_jsonl_key_a_parquet_column_and_a_subfolder(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"text": " one ", "lang": "fr"}) + "\n" + json.dumps({"text": "two", "lang": 3}) + "\n")
    assert read_grouped(jsonl, "lang") == [("one", "fr"), ("two", "3")]
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None], "lang": ["de", "fr", "es"]}), parquet)
    assert read_grouped(parquet, "lang") == [("a", "de"), ("b", "fr")]
    pq.write_table(pa.table({"text": ["a", "b"], "lang": ["de", None]}), parquet)
    with pytest.raises(TextsError, match=r"domains.field: row 1 of .*t.parquet has a text but no 'lang'"):
        read_grouped(parquet, "lang")
    for group, name in (("code", "x.txt"), ("code", "y.txt"), ("prose", "z.txt")):
        (tmp_path / "folder" / group).mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / group / name).write_text(f"{group} {name}")
    assert read_grouped(tmp_path / "folder", "domain") == [("code x.txt", "code"), ("code y.txt", "code"),
                                                           ("prose z.txt", "prose")]


def test_the_grouped_reader_names_a_missing_field_and_a_source_without_fields(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"id": 1, "text": "one"}) + "\n")
    with pytest.raises(TextsError, match=r"domains.field: 'domain' is missing from line 1 of .*t.jsonl \(its fields: id\)"):
        read_grouped(jsonl, "domain")
    txt = tmp_path / "t.txt"
    txt.write_text("one\ntwo\n")
    with pytest.raises(TextsError, match=r"domains.source: .*t.txt is a .txt file, whose texts have no field to group by"):
        read_grouped(txt, "domain")
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("text,domain\na,b\n")
    with pytest.raises(TextsError, match=r"domains.source: .*t.csv has an unsupported type"):
        read_grouped(csv_file, "domain")
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a"]}), parquet)
    with pytest.raises(TextsError, match=r"domains.field: .*t.parquet has no column 'domain' \(columns: text\)"):
        read_grouped(parquet, "domain")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("a")
    with pytest.raises(TextsError, match="has no subfolder holding .txt files"):
        read_grouped(tmp_path / "flat", "domain")


def test_the_default_labelled_corpus_holds_the_default_corpus_and_five_groups_with_enough_texts():
    root = Path(__file__).parents[2] / "data" / "texts"
    corpus = (root / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    labelled = (root / "domains.jsonl").read_text(encoding="utf-8").splitlines()
    assert labelled[:len(corpus)] == corpus, "domains.jsonl starts with the default corpus, unchanged"
    pairs = read_grouped(root / "domains.jsonl", "domain")
    counts: dict[str, int] = {}
    for _, g in pairs:
        counts[g] = counts.get(g, 0) + 1
    dp = DomainsParams()
    enough = sorted(g for g, n in counts.items() if n >= dp.n_in_sample + dp.n_heldout)
    assert enough == ["code", "dialogue", "math", "multilingual", "prose"]
    assert len(counts) == 14, "every domain of the corpus is still there"
