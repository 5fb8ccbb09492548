"""Corpus -> token blocks: sources, cleaning, packing, grouping, cache, batch order, checks."""

import bz2
import os
import random
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from distill.common.assets import minilm_dir, wiki_extract_path
from distill.common.errors import UsageError
from distill.data import corpus as data
from tests import tiny


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return AutoTokenizer.from_pretrained(vocab_dir)


@pytest.fixture(scope="module")
def minilm_tok():
    return AutoTokenizer.from_pretrained(minilm_dir())


def random_lines(n, seed=0, max_words=40):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.choice([0, 0, 1, 3, 8, 20, max_words])  # empty lines and long ones too
        lines.append(" ".join(rng.choice(tiny.WORDS) for _ in range(k)) + rng.choice(["", ".", " , x"]))
    return lines


def encode_lines(tok, lines, sep=None):
    """The independent reference: tokenizer.encode, line by line, on the non-empty stripped lines (each
    followed by ``sep`` when given: the packed stream's paragraph ends)."""
    out = []
    for line in lines:
        if line.strip():
            out.extend(tok.encode(line.strip(), add_special_tokens=False))
            out.extend([] if sep is None else [sep])
    return out


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- wikitext layout and hub


WIKI_RAW = (
    " \n"
    " = Valkyria Chronicles III = \n"
    " \n"
    " Senjō no Valkyria 3 is a tactical role @-@ playing game with 1 @,@ 000 units and 2 @.@ 5 stars . \n"
    " \n"
    " = = Gameplay = = \n"
    " \n"
    " = = = Sub section = = = \n"
    " The game <unk> began development in 2010 . \n"
    "\n"
)


def test_wikitext_lines_lose_headings_and_empty_lines_and_keep_paragraphs():
    assert data.clean_wikitext_line(" = Valkyria Chronicles III = \n") is None
    assert data.clean_wikitext_line(" = = = Sub section = = = \n") is None
    assert data.clean_wikitext_line(" \n") is None
    assert data.clean_wikitext_line(" a role @-@ playing game of 1 @,@ 000 and 2 @.@ 5 . \n") == (
        "a role-playing game of 1,000 and 2.5 ."
    )
    assert data.clean_wikitext_line(" It was <unk> . ") == "It was [UNK] ."
    assert data.clean_wikitext_line(" x = y = z \n") == "x = y = z"  # an equation is not a heading


def test_wiki_train_raw_file_gives_only_its_paragraphs(tmp_path):
    path = write(tmp_path / "wiki.train.raw", WIKI_RAW)
    assert data.file_format(path) == "wikitext"
    docs = list(data.iter_documents(path))
    assert docs == [
        ["Senjō no Valkyria 3 is a tactical role-playing game with 1,000 units and 2.5 stars ."],
        ["The game [UNK] began development in 2010 ."],
    ]


def test_hub_wikitext_goes_through_load_dataset_and_the_same_line_cleaning(tmp_path, tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": WIKI_RAW.splitlines(keepends=True)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = data.load_corpus_blocks("wikitext:wikitext-103-raw-v1", tok, 12, tmp_path, mode="group")
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "train")]
    inner = [t for row in ds["input_ids"] for t in row[1:-1]]
    expect = [data.clean_wikitext_line(line) for line in WIKI_RAW.splitlines()]
    assert inner == encode_lines(tok, [e for e in expect if e])

    src = data.parse_source("hub:someone/corpus:cfg", split="validation")
    assert (src.hub_id, src.hub_config, src.split) == ("someone/corpus", "cfg", "validation")
    with pytest.raises(UsageError, match="unknown wikitext config 'wikitext-7'.*wikitext-103-raw-v1"):
        data.parse_source("wikitext:wikitext-7")


def test_wikitexts_unk_becomes_the_tokenizers_own_unknown_token(tmp_path, tok):
    from tests import tiny

    bpe = AutoTokenizer.from_pretrained(tiny.save_bpe_tokenizer(tmp_path / "bpe"))
    assert bpe.unk_token == "<unk>" and tok.unk_token == "[UNK]"
    path = write(tmp_path / "wiki.train.raw", WIKI_RAW)
    for tokenizer in (bpe, tok):
        ds = data.load_corpus_blocks(path, tokenizer, 64, tmp_path / "cache", mode="group")
        last = ds["input_ids"][-1]  # "The game <unk> began development in 2010 ."
        expect = tokenizer.encode(f"The game {tokenizer.unk_token} began development in 2010 .",
                                  add_special_tokens=False)
        assert last[1:-1] == expect and expect.count(tokenizer.unk_token_id) == 1
    # "[UNK]" means nothing to a byte-level BPE: it used to become six pieces, and no unknown token at all
    assert bpe.unk_token_id not in bpe.encode("[UNK]", add_special_tokens=False)


def test_a_hub_dataset_other_than_wikitext_is_not_cleaned_as_wikitext(tmp_path, tok, monkeypatch):
    import datasets

    lines = [" a role @-@ playing game \n", "", " = Not a heading here = \n", "   \n", "plain text"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": lines}))
    ds = data.load_corpus_blocks("hub:someone/corpus", tok, 64, tmp_path, mode="group")
    kept = [line.strip() for line in lines if line.strip()]  # only stripped, empty rows dropped
    assert [row[1:-1] for row in ds["input_ids"]] == [tok.encode(k, add_special_tokens=False) for k in kept]
    assert data.parse_source("hub:Salesforce/wikitext:wikitext-2-raw-v1").is_wikitext
    assert not data.parse_source("hub:someone/corpus").is_wikitext


def test_a_hub_revision_is_loaded_and_keys_the_cache_and_an_unpinned_key_is_unchanged(tmp_path, tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append(revision)
        return datasets.Dataset.from_dict({"text": [f"text of {revision}"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = data.parse_source("hub:someone/corpus:cfg@v1.0")
    assert (src.hub_id, src.hub_config, src.revision) == ("someone/corpus", "cfg", "v1.0")
    assert data.parse_source("wikitext:wikitext-2-raw-v1@abc123").revision == "abc123"
    # the keys of the sources that had caches before revisions, cleanings and unknown tokens were told apart are
    # what they were (so those caches stay): the recipes' wikitext for a BERT-style tokenizer, and local text
    old_keys = {"v", "source", "tokenizer", "max_documents"}
    wikitext = data.parse_source("wikitext:wikitext-103-raw-v1")
    assert wikitext.fingerprint() == {"hub": "Salesforce/wikitext", "config": "wikitext-103-raw-v1", "split": "train"}
    assert data.tokens_key_payload(wikitext, "t", None, "[UNK]").keys() == old_keys
    assert data.tokens_key_payload(wikitext, "t", None, "<unk>")["unk"] == "<unk>"  # other text: another key
    other = data.parse_source("hub:someone/corpus:cfg")
    assert data.tokens_key_payload(other, "t", None, "[UNK]")["cleaning"] == "lines"  # no longer wikitext-cleaned
    local = data.parse_source(write(tmp_path / "plain.txt", "some text\n"))
    assert data.tokens_key_payload(local, "t", None, "<unk>").keys() == old_keys
    from distill.models.card import corpus_dataset  # the card names the dataset, not its revision
    assert [corpus_dataset(c) for c in ("hub:org/ds@v1", "hub:org/ds:cfg@v1", "wikitext:wikitext-2-raw-v1@abc")] == [
        "org/ds", "org/ds", "Salesforce/wikitext"]
    rows = {}
    for spec in ("hub:someone/corpus:cfg@v1.0", "hub:someone/corpus:cfg@v2.0", "hub:someone/corpus:cfg"):
        ds = data.load_corpus_blocks(spec, tok, 32, tmp_path, mode="group")
        rows[spec] = ds["input_ids"][0][1:-1]
    assert calls == ["v1.0", "v2.0", None]  # each revision its own cache: loaded, not read from another's
    assert rows["hub:someone/corpus:cfg@v1.0"] == tok.encode("text of v1.0", add_special_tokens=False)
    assert rows["hub:someone/corpus:cfg@v2.0"] == tok.encode("text of v2.0", add_special_tokens=False)
    for bad in ("hub:someone/corpus@", "hub:a@b@c"):
        with pytest.raises(UsageError, match="write one @<revision>"):
            data.parse_source(bad)


# --------------------------------------------------------------------------- MediaWiki dumps

DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo>
    <namespaces><namespace key="0" case="first-letter" /><namespace key="1" case="first-letter">Talk</namespace></namespaces>
  </siteinfo>
  <page>
    <title>Enhydra</title><ns>0</ns><id>1</id><redirect title="Sea otter" />
    <revision><id>10</id><text xml:space="preserve">#REDIRECT [[Sea otter]] redirect text must not appear</text></revision>
  </page>
  <page>
    <title>Talk:Sea otter</title><ns>1</ns><id>2</id>
    <revision><id>11</id><text xml:space="preserve">Talk page text must not appear.</text></revision>
  </page>
  <page>
    <title>Sea otter</title><ns>0</ns><id>3</id>
    <revision><id>12</id><text xml:space="preserve">{{Infobox animal|name=Sea otter|status=EN}}
'''Sea otters''' are [[marine mammal]]s of the [[Pacific Ocean|northern Pacific]].&lt;ref&gt;{{cite book|title=Otters}} Reference text must go.&lt;/ref&gt; They weigh 14 to 45&amp;nbsp;kg.&lt;ref name=w/&gt;&lt;ref&gt;[[Otter book|Otters]]'' unbalanced italics&lt;/ref&gt;

[[File:Sea otter.jpg|thumb|A caption that must go]]
== Behaviour ==
Sea otters use ''rocks'' as tools.&lt;!-- a comment --&gt; See [http://example.org the site] and http://example.org/bare too.
* A list item that must go
{| class="wikitable"
| A table cell that must go
|}
[[Category:Mustelids]]
[[de:Seeotter]]</text></revision>
  </page>
</mediawiki>
"""

DUMP_PARAGRAPHS = [
    "Sea otters are marine mammals of the northern Pacific. They weigh 14 to 45 kg.",
    "Sea otters use rocks as tools. See the site and too.",  # bare URLs go too
]


def test_mediawiki_dump_gives_only_the_articles_clean_text(tmp_path, tok):
    path = tmp_path / "enwiki-pages-articles.xml.bz2"
    path.write_bytes(bz2.compress(DUMP.encode("utf-8")))
    assert data.file_format(str(path)) == "mediawiki"
    assert [title for title, _ in data.iter_mediawiki_articles(str(path))] == ["Sea otter"]
    assert list(data.iter_documents(str(path))) == [DUMP_PARAGRAPHS]

    ds = data.load_corpus_blocks(str(path), tok, 64, tmp_path / "cache", mode="group")
    assert [row[1:-1] for row in ds["input_ids"]] == [tok.encode(p, add_special_tokens=False) for p in DUMP_PARAGRAPHS]

    plain = write(tmp_path / "dump.xml", DUMP)  # uncompressed works the same
    assert list(data.iter_documents(plain)) == [DUMP_PARAGRAPHS]


@pytest.mark.slow
def test_real_wikipedia_extract_yields_real_english(tmp_path, minilm_tok):
    path = wiki_extract_path()  # named ...-shortened.bz2: recognised by content, not name
    assert data.file_format(path) == "mediawiki"
    paragraphs = list(data.iter_paragraphs([path], max_documents=3))
    assert paragraphs[0].startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert len(paragraphs) > 50
    for p in paragraphs:
        assert not any(m in p for m in ("[[", "]]", "{{", "}}", "<ref", "'''", "&lt;", "&amp;", "Category:")), p
    words = " ".join(paragraphs).split()
    assert sum(w.strip(".,;:()\"'").isalpha() for w in words) / len(words) > 0.85

    ds = data.load_corpus_blocks(path, minilm_tok, 128, tmp_path, max_documents=3)
    counts = data.token_counts(ds, len(minilm_tok))
    assert counts[minilm_tok.unk_token_id] / counts.sum() < 0.005
    top = set(minilm_tok.convert_ids_to_tokens(np.argsort(counts)[-12:].tolist()))
    assert {"the", ",", ".", "of", "and"} <= top


# --------------------------------------------------------------------------- packing and grouping


def test_packing_gives_exact_blocks_that_reproduce_the_corpus_in_order(tmp_path, tok):
    lines = random_lines(300)
    path = write(tmp_path / "corpus.txt", "\n".join(lines) + "\n")
    ds = data.load_corpus_blocks(path, tok, 16, tmp_path / "cache")
    rows = np.asarray(ds["input_ids"].to_pylist() if hasattr(ds["input_ids"], "to_pylist") else ds["input_ids"])
    assert rows.ndim == 2 and rows.shape[1] == 16 and len(rows) > 100
    assert np.all(rows[:, 0] == tok.cls_token_id) and np.all(rows[:, -1] == tok.sep_token_id)
    stream = encode_lines(tok, lines, sep=tok.sep_token_id)  # each paragraph ends with [SEP], as run_mlm's do
    packed = rows[:, 1:-1].ravel().tolist()
    assert packed == stream[: len(packed)]
    assert 0 <= len(stream) - len(packed) < 14  # only the tail shorter than one block is dropped
    batch = data.collate(ds.with_format("numpy")[[3, 1, 4]], tok.pad_token_id)
    assert batch["input_ids"].shape == (3, 16) and bool(batch["attention_mask"].all())  # packing: no padding


def test_folder_and_glob_read_files_in_sorted_order_and_num_proc_changes_nothing(tmp_path, tok):
    folder = tmp_path / "corpus"
    folder.mkdir()
    parts = [random_lines(60, seed=s) for s in range(3)]
    for i, lines in enumerate(parts):
        write(folder / f"part{i}.txt", "\n".join(lines))
    write(folder / ".hidden", "never read")
    expect = encode_lines(tok, [line for lines in parts for line in lines], sep=tok.sep_token_id)
    one = data.load_corpus_blocks(str(folder), tok, 10, tmp_path / "c1")
    two = data.load_corpus_blocks(str(folder / "part*.txt"), tok, 10, tmp_path / "c2", num_proc=2)
    assert one["input_ids"][:] == two["input_ids"][:]
    packed = [t for row in one["input_ids"] for t in row[1:-1]]
    assert packed == expect[: len(packed)]


def test_grouping_keeps_every_token_within_block_size_and_pads_less_than_random_order(tmp_path, tok):
    lines = random_lines(400, seed=1, max_words=60)
    path = write(tmp_path / "corpus.txt", "\n".join(lines))
    block = 24
    ds = data.load_corpus_blocks(path, tok, block, tmp_path / "cache", mode="group")
    rows, lengths = ds["input_ids"][:], ds["length"][:]
    assert all(len(r) == n <= block for r, n in zip(rows, lengths))
    assert all(r[0] == tok.cls_token_id and r[-1] == tok.sep_token_id and len(r) >= 3 for r in rows)
    assert max(lengths) == block  # long paragraphs were split, not dropped
    per_line = [tok.encode(line.strip(), add_special_tokens=False) for line in lines if line.strip()]
    per_line = [ids for ids in per_line if ids]
    assert len(rows) == sum(-(-len(ids) // (block - 2)) for ids in per_line)
    assert [t for r in rows for t in r[1:-1]] == [t for ids in per_line for t in ids]  # nothing truncated
    np.testing.assert_array_equal(data.sequence_lengths(ds), lengths)

    def padding(order, bs=8):
        lens = np.asarray(lengths)[order]
        return sum(int(lens[i:i + bs].max()) * len(lens[i:i + bs]) - int(lens[i:i + bs].sum())
                   for i in range(0, len(lens), bs))

    grouped = data.length_grouped_order(lengths, 8, seed=0, epoch=0, megabatch_mult=8)
    shuffled = data.epoch_order(len(lengths), seed=0, epoch=0)
    assert padding(grouped) < 0.5 * padding(shuffled)

    batch = data.collate(ds[grouped[:8].tolist()], tok.pad_token_id)
    n = np.asarray(lengths)[grouped[:8]]
    assert batch["input_ids"].shape == (8, n.max())
    assert batch["attention_mask"].sum(1).tolist() == n.tolist()
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id)


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = data.epoch_order(1000, seed=3, epoch=0)
    assert a.dtype == np.int64 and sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, data.epoch_order(1000, seed=3, epoch=0))
    assert not np.array_equal(a, data.epoch_order(1000, seed=3, epoch=1))
    assert not np.array_equal(a, data.epoch_order(1000, seed=4, epoch=0))


def test_length_grouped_order_is_a_permutation_longest_batch_first_short_batch_last():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 129, size=1003)
    order = data.length_grouped_order(lengths, batch_size=16, seed=1, epoch=2)
    assert sorted(order.tolist()) == list(range(1003))
    assert lengths[order[:16]].max() == lengths.max()
    assert np.array_equal(order, data.length_grouped_order(lengths, 16, seed=1, epoch=2))
    assert not np.array_equal(order, data.length_grouped_order(lengths, 16, seed=1, epoch=3))
    # the one short batch (1003 = 62 * 16 + 11) is the last one; every batch is length-homogeneous
    batches = [order[i:i + 16] for i in range(0, 1003, 16)]
    assert len(batches[-1]) == 11
    spread = np.mean([np.ptp(lengths[b]) for b in batches[:-1]])
    assert spread < 20  # random batches of 16 would spread over ~110


# --------------------------------------------------------------------------- cache and counts


def test_second_call_reuses_the_cache_and_never_tokenises_again(tmp_path, tok, monkeypatch):
    lines = random_lines(200, seed=2)
    path = write(tmp_path / "corpus.txt", "\n".join(lines))
    cache = tmp_path / "cache"
    first = data.load_corpus_blocks(path, tok, 16, cache)
    blocks_file = first.cache_files[0]["filename"]
    stamp = os.stat(blocks_file).st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("the corpus was tokenised again")

    monkeypatch.setattr(data, "_tokenize_batch", boom)
    again = data.load_corpus_blocks(path, tok, 16, cache)
    assert again.cache_files[0]["filename"] == blocks_file and os.stat(blocks_file).st_mtime_ns == stamp
    assert again["input_ids"][:] == first["input_ids"][:]
    # other block settings reuse the tokenised corpus: still no tokenisation
    grouped = data.load_corpus_blocks(path, tok, 32, cache, mode="group")
    assert len(grouped) > 0
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == [data.LOCKS_DIR, "blocks", "blocks", "tokens"]
    # a changed corpus is a new key: it is tokenised (and here the patched tokenizer fires)
    write(tmp_path / "corpus.txt", "\n".join(lines[:50]))
    with pytest.raises(AssertionError, match="tokenised again"):
        data.load_corpus_blocks(path, tok, 16, cache)
    assert not any(p.name.startswith(".") and p.name != data.LOCKS_DIR for p in cache.iterdir())  # left nothing


def test_token_counts_are_exact_and_cached_with_the_blocks(tmp_path, tok, monkeypatch):
    path = write(tmp_path / "corpus.txt", "\n".join(random_lines(200, seed=3)))
    ds = data.load_corpus_blocks(path, tok, 16, tmp_path / "cache")
    vocab = tiny.VOCAB_SIZE  # the model's vocab_size: the tiny vocab.txt lists "a" twice, so len(tok) is one less
    counts = data.token_counts(ds, vocab)
    flat = np.concatenate([np.asarray(r) for r in ds["input_ids"]])
    np.testing.assert_array_equal(counts, np.bincount(flat, minlength=vocab))
    assert counts.dtype == np.int64 and counts[tok.cls_token_id] == len(ds)
    cached = os.path.join(os.path.dirname(ds.cache_files[0]["filename"]), f"token_counts-{vocab}.npy")
    assert os.path.isfile(cached)

    monkeypatch.setattr(np, "bincount", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recounted")))
    np.testing.assert_array_equal(data.token_counts(ds, vocab), counts)
    monkeypatch.undo()
    for part in (ds.select(range(3)), ds.select([5, 0, 9])):  # a part is counted, not read from the cache
        assert data.token_counts(part, vocab).sum() == 3 * 16
    with pytest.raises(UsageError, match="outside vocab_size 5"):
        data.token_counts(part, 5)


# --------------------------------------------------------------------------- clear errors


def test_missing_or_empty_corpus_is_one_clear_error(tmp_path, tok):
    with pytest.raises(UsageError, match="corpus path .*nowhere.txt' does not exist"):
        data.load_corpus_blocks(str(tmp_path / "nowhere.txt"), tok, 16, tmp_path / "c")
    with pytest.raises(UsageError, match="matches no file"):
        data.load_corpus_blocks(str(tmp_path / "*.nothing"), tok, 16, tmp_path / "c")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UsageError, match="holds no files"):
        data.load_corpus_blocks(str(tmp_path / "empty_dir"), tok, 16, tmp_path / "c")
    with pytest.raises(UsageError, match="yielded no text"):
        data.load_corpus_blocks(write(tmp_path / "blank.txt", "\n  \n\t\n"), tok, 16, tmp_path / "c")
    with pytest.raises(UsageError, match="yielded no text"):
        data.load_corpus_blocks(write(tmp_path / "wiki.train.raw", " = Title = \n \n = = Sub = = \n"), tok, 16,
                                tmp_path / "c")
    with pytest.raises(UsageError, match="fewer than one block"):
        data.load_corpus_blocks(write(tmp_path / "short.txt", "the city\n"), tok, 64, tmp_path / "c")
    assert not any(p.name.startswith(".") and p.name != data.LOCKS_DIR for p in (tmp_path / "c").iterdir())


def test_bad_settings_are_clear_errors(tmp_path, tok):
    path = write(tmp_path / "corpus.txt", "the city of the world\n")
    with pytest.raises(UsageError, match="mode 'chunks' is unknown"):
        data.load_corpus_blocks(path, tok, 16, tmp_path / "c", mode="chunks")
    with pytest.raises(UsageError, match="block_size 2 is too small"):
        data.load_corpus_blocks(path, tok, 2, tmp_path / "c")
    with pytest.raises(UsageError, match=r"block_size 1024 is larger .*max_position_embeddings = 512.*<= 512"):
        data.check_block_size(1024, 512)
    data.check_block_size(512, 512)
    with pytest.raises(UsageError, match="not a readable MediaWiki XML dump"):
        list(data.iter_documents(write(tmp_path / "broken.xml", "<mediawiki><page><title>x</title>")))


def _tokenizer_with_vocab(folder, tokens, **kwargs):
    from transformers import BertTokenizer

    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return BertTokenizer.from_pretrained(str(folder), **kwargs)


def test_teacher_and_student_tokenizers_must_match(tmp_path, tok, minilm_tok, vocab_dir):
    data.check_same_tokenizer(tok, AutoTokenizer.from_pretrained(vocab_dir))
    with pytest.raises(UsageError, match=f"teacher tokenizer has 30522 ids and the student tokenizer {len(tok)}"):
        data.check_same_tokenizer(minilm_tok, tok)
    words = tiny.vocab_tokens()
    swapped = words[:2] + [words[3], words[2]] + words[4:]  # [CLS] and [SEP] trade places
    with pytest.raises(UsageError, match=r"\[CLS\] different ids \(2 vs 3\)"):
        data.check_same_tokenizer(tok, _tokenizer_with_vocab(tmp_path / "a", swapped))
    renamed = words[:-1] + ["zebra"]
    with pytest.raises(UsageError, match="vocabularies differ .*'made'|vocabularies differ .*'zebra'"):
        data.check_same_tokenizer(tok, _tokenizer_with_vocab(tmp_path / "b", renamed))
    shutil.copy(os.path.join(vocab_dir, "vocab.txt"), tmp_path / "vocab.txt")
    cased = _tokenizer_with_vocab(tmp_path / "c", words, do_lower_case=False)
    with pytest.raises(UsageError, match="split the same text differently"):
        data.check_same_tokenizer(tok, cased)
