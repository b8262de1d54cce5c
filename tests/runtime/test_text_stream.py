from ember.runtime.generate import TextStream


def feed(stream, pieces):
    out = "".join(stream.push(p) for p in pieces)
    return out + stream.finish()


def test_multibyte_characters_split_across_tokens():
    data = "héllo 😀 wörld".encode()
    pieces = [data[i:i + 1] for i in range(len(data))]
    s = TextStream()
    shown = []
    for p in pieces:
        shown.append(s.push(p))
    assert "".join(shown) + s.finish() == "héllo 😀 wörld"
    assert all("\ufffd" not in part for part in shown)


def test_stop_string_is_not_shown_and_text_before_it_is():
    s = TextStream(stops=["</end>"])
    out = feed(s, [b"abc </", b"en", b"d> tail"])
    assert out == "abc "
    assert s.stop_hit()


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    s = TextStream(stops=["STOP"])
    first = s.push(b"one ST")
    assert first == "one "
    assert s.push(b"ar") == "STar"
    assert s.finish() == ""
    assert not s.stop_hit()
