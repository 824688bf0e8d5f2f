"""classify: the matching rules of DESIGN.md through the public API, the cache, and real UT1 data."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from filterd.classify import Classifier, ListSpec
from filterd.errors import FilterdError
from filterd.verdict import Match

FIXTURES = Path(__file__).parent / "fixtures" / "lists"
SG = FIXTURES / "squidguard"
GROUPS = {"social_media": ["social", "forums", "chat"], "bypass": ["nothing-listed"]}


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    specs = [
        ListSpec("social", "social", SG / "social", "squidguard"),
        ListSpec("forums", "forums", SG / "forums", "squidguard"),
        ListSpec("ads", "ads", FIXTURES / "hosts.txt", "hosts"),
        ListSpec("gambling", "gambling", FIXTURES / "domains.txt", "domains"),
        ListSpec("plain", "plain", FIXTURES / "urls.txt", "urls"),
    ]
    return Classifier.build(specs, None, GROUPS)


@pytest.mark.parametrize(
    ("url", "categories"),
    [
        # label boundaries
        ("http://example-social.com/", ("social", "social_media")),
        ("http://a.b.example-social.com/x", ("social", "social_media")),
        ("http://badexample-social.com/", ()),
        ("http://example-social.co/", ()),
        # host spellings: case, trailing dot, port, IDNA, IPv4 numbers
        ("HTTP://EXAMPLE-SOCIAL.COM.:8080/", ("social", "social_media")),
        ("http://www.bücher.de/", ("social", "social_media")),
        ("http://xn--bcher-kva.de/", ("social", "social_media")),
        ("http://faß.de/", ("social", "social_media")),
        ("http://upper.example.org/", ("social", "social_media")),
        ("http://10.9.8.7/", ("social", "social_media")),
        ("http://0x0a.9.8.7/", ("social", "social_media")),
        ("http://168364039/", ("social", "social_media")),
        ("http://012.9.8.7/", ("social", "social_media")),
        ("http://10.9.2055/", ("social", "social_media")),
        ("http://127.1/", ("gambling",)),
        ("http://0x7f000001/", ("gambling",)),
        ("http://2130706433/", ("gambling",)),
        ("http://dotted.example/", ("social", "social_media")),
        ("http://x.wild.example/", ("social", "social_media")),
        ("http://lynns_postcards.gaulin.com/", ("social", "social_media")),
        # URL entries: segment-boundary path prefix
        ("http://video.example/watch", ("social", "social_media")),
        ("http://video.example/watch/", ("social", "social_media")),
        ("http://video.example/watch/123", ("social", "social_media")),
        ("http://video.example/watch?v=1", ("social", "social_media")),
        ("http://m.video.example/watch", ("social", "social_media")),
        ("http://video.example/watchlist", ()),
        ("http://video.example/", ()),
        ("http://video.example/Watch", ()),  # paths are case-sensitive
        ("http://video.example/a/../watch", ("social", "social_media")),
        ("http://video.example/%77atch", ("social", "social_media")),  # %77 is "w"
        ("http://case.example/Path/Upper/x", ("social", "social_media")),
        ("http://case.example/path/upper/x", ()),
        ("http://pct.example/caf%C3%A9/menu", ("social", "social_media")),
        ("http://pct.example/café/menu", ("social", "social_media")),
        ("http://pct.example/cafe/menu", ()),
        ("http://45.90.163.37//arm4", ("social", "social_media")),
        ("http://45.90.163.37/arm4", ()),
        ("http://whole.example/anything?at=all", ("social", "social_media")),
        # query parameters: a subset, in any order
        ("http://search.example/results?q=bad&safe=off", ("social", "social_media")),
        ("http://search.example/results?safe=off&page=2&q=bad", ("social", "social_media")),
        ("http://search.example/results?q=bad", ()),
        ("http://search.example/results?q=good&safe=off", ()),
        ("http://search.example/results/more?safe=off&q=bad", ("social", "social_media")),
        ("http://theonion.com/bin/onionimp.cgi?ticker2.gif", ("social", "social_media")),
        ("http://theonion.com/bin/onionimp.cgi", ()),
        # several categories, several formats
        ("https://www.facebook.com/me", ("forums", "social", "social_media")),
        ("http://ads.example/", ("ads",)),
        ("http://tracker.example/", ("ads",)),
        ("http://localhost/", ()),
        ("http://casino.example/", ("gambling",)),
        ("http://plain.example/a/b/c", ("plain",)),
        ("http://plain.example/q?x=1", ("plain",)),
        ("http://plain.example/q", ()),
        ("http://unlisted.example/", ()),
    ],
)
def test_classify(classifier: Classifier, url: str, categories: tuple[str, ...]) -> None:
    assert classifier.classify(url).categories == categories


def test_what_carries_canonical_forms_and_every_match(classifier: Classifier) -> None:
    what = classifier.classify("HTTP://user:pw@WWW.Facebook.COM.:443/Me?A=1#x")
    assert (what.host, what.url) == ("www.facebook.com", "http://www.facebook.com:443/Me?A=1")
    assert what.matches == (Match("forums", "forums", "facebook.com"), Match("social", "social", "facebook.com"))
    what = classifier.classify("http://x.upper.example.org/")
    assert what.matches == (Match("social", "social", "UPPER.Example.ORG"),)
    what = classifier.classify("http://www.bücher.de/")
    assert what.matches == (Match("social", "social", "Bücher.de"),)


def test_classify_host(classifier: Classifier) -> None:
    what = classifier.classify_host("WWW.FACEBOOK.com.:443")
    assert (what.host, what.url, what.categories) == ("www.facebook.com", None, ("forums", "social", "social_media"))
    assert classifier.classify_host("whole.example").categories == ("social", "social_media")
    assert classifier.classify_host("video.example").categories == ()  # its URL entry needs a path
    assert classifier.classify_host("[::1]").categories == ()


@pytest.mark.parametrize("url", ["mailto:x@y.example", "http://", "http://1.2.3.4.5/", "foo://x/"])
def test_bad_urls_raise_value_error(classifier: Classifier, url: str) -> None:
    with pytest.raises(ValueError):
        classifier.classify(url)


def test_categories_and_lists(classifier: Classifier) -> None:
    assert classifier.categories == frozenset(
        {"social", "forums", "ads", "gambling", "plain", "social_media", "bypass"})
    stats = {s.name: s for s in classifier.lists}
    assert (stats["social"].entries, stats["social"].skipped) == (17, 3)  # 9 + 8 entries; 1 + 1 + 1 skips
    assert stats["social"].format == "squidguard" and stats["social"].source == str(SG / "social")
    assert {s.reason for s in stats["ads"].skips} >= {"not a domain name"}


def test_unknown_format_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(FilterdError) as error:
        Classifier.build([ListSpec("x", "x", tmp_path, "adblock")], None)
    assert error.value.field == "lists[0].format"


def test_missing_list_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FilterdError) as error:
        Classifier.build([ListSpec("x", "x", tmp_path / "nope", "domains")], tmp_path / "cache")
    assert error.value.file == str(tmp_path / "nope")


def _spec(path: Path) -> list[ListSpec]:
    return [ListSpec("mine", "games", path, "domains")]


def test_cache_is_reused_recompiled_on_change_and_rebuilt_when_damaged(tmp_path: Path) -> None:
    source = tmp_path / "domains"
    source.write_text("".join(f"site{i}.example\n" for i in range(20000)))
    cache = tmp_path / "cache"
    started = time.perf_counter()
    first = Classifier.build(_spec(source), cache)
    compile_seconds = time.perf_counter() - started
    assert not first.from_cache and first.index_path.parent == cache

    started = time.perf_counter()
    second = Classifier.build(_spec(source), cache)
    load_seconds = time.perf_counter() - started
    assert second.from_cache and second.index_path == first.index_path
    assert second.lists == first.lists
    assert load_seconds < compile_seconds
    assert second.classify("http://a.site7.example/").categories == ("games",)

    source.write_text("other.example\n")
    third = Classifier.build(_spec(source), cache)
    assert not third.from_cache and third.index_path != first.index_path
    assert third.classify("http://site7.example/").categories == ()
    assert third.classify("http://other.example/").categories == ("games",)

    data = bytearray(third.index_path.read_bytes())
    data[len(data) // 3] ^= 0x55
    third.index_path.write_bytes(bytes(data))
    fourth = Classifier.build(_spec(source), cache)
    assert not fourth.from_cache
    assert fourth.classify("http://other.example/").categories == ("games",)
    assert Classifier.build(_spec(source), cache).from_cache
    assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]
    assert os.listdir(cache) == [fourth.index_path.name]  # older indexes of these lists removed
    other = Classifier.build([ListSpec("other", "games", source, "domains")], cache)
    assert sorted(os.listdir(cache)) == sorted([fourth.index_path.name, other.index_path.name])


def test_unwritable_cache_folder_falls_back_to_memory(tmp_path: Path) -> None:
    source = tmp_path / "domains"
    source.write_text("a.example\n")
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    built = Classifier.build(_spec(source), blocker)
    assert built.index_path is None and not built.from_cache
    assert built.classify_host("a.example").categories == ("games",)


def test_group_names_are_categories_of_members(tmp_path: Path) -> None:
    source = tmp_path / "domains"
    source.write_text("a.example\n")
    built = Classifier.build([ListSpec("l", "chat", source, "domains")], None,
                             {"social_media": ["chat", "blog"], "talk": ["chat"], "other": ["x"]})
    assert built.classify_host("a.example").categories == ("chat", "social_media", "talk")


# --- real data: the UT1 lists, loaded once ---------------------------------------------------


@pytest.fixture(scope="module")
def ut1_classifier(ut1: Path, tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    specs = [ListSpec(p.name, p.name, p, "squidguard") for p in sorted(ut1.iterdir()) if p.is_dir()]
    return Classifier.build(specs, tmp_path_factory.mktemp("ut1-cache"),
                            {"social_media": ["social_networks", "blog", "chat", "forums", "audio-video"]})


def test_ut1_canary_urls(ut1: Path, ut1_classifier: Classifier) -> None:
    checked = 0
    for folder in sorted(p for p in ut1.iterdir() if p.is_dir()):
        urls = folder / "urls"
        if not urls.is_file():
            continue
        for line in urls.read_text("utf-8").splitlines():
            if line.startswith("cri.univ-tlse1.fr/tools/test_filtrage/"):
                what = ut1_classifier.classify("http://" + line)
                assert folder.name in what.categories, (line, what.categories)
                assert Match(folder.name, folder.name, line) in what.matches
                checked += 1
    assert checked >= 30


def test_ut1_facebook(ut1_classifier: Classifier) -> None:
    what = ut1_classifier.classify("https://www.facebook.com/groups/x")
    assert {"social_networks", "blog", "forums", "social_media"} <= set(what.categories)
    assert ut1_classifier.classify("https://notfacebook.com/").categories == ()


def test_ut1_cache_loads_fast(ut1_classifier: Classifier, ut1: Path) -> None:
    specs = [ListSpec(p.name, p.name, p, "squidguard") for p in sorted(ut1.iterdir()) if p.is_dir()]
    started = time.perf_counter()
    again = Classifier.build(specs, ut1_classifier.index_path.parent)
    assert again.from_cache
    assert time.perf_counter() - started < 2.0  # hashing ~15 MB of sources + mapping; compiling takes far longer
    assert again.lists == ut1_classifier.lists
