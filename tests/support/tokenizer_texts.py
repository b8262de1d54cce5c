"""Texts on which two tokenizers that should agree (ember's Python tokenizer and the native
runtime's C one) are compared: empty and white-space-only texts, runs of spaces, tabs and line
breaks, accents (composed and combining), CJK, emoji with joiners, special-token texts, digits,
contractions, punctuation runs, a byte that is no UTF-8 (passed as Python's surrogateescape
spells it), and long inputs."""

HARD_TEXTS = [
    "", " ", "  ", "a", "Hello", " Hello", "Hello  world", "tab\tand\nnewline\r\n", "    four spaces",
    "trailing   ", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀 and ZWJ 👩‍👩‍👧", "ﬁ ligature, Ω, ß, ǅ",
    "<start_of_turn>user\nhi<end_of_turn>", "<bos><bos>", "a<unk>b", "<0x41> is not a byte token",
    "mixed 123 456.789 -0", "\u2581visible space mark", "x" * 300, "ab " * 400 + "end",
    "😀" * 50, "the quick brown fox " * 100,
]

# what byte-level BPE pre-tokenizers split on: contractions in both cases, digit runs of every
# length and script, white space runs before text, line breaks and the end, punctuation runs
BPE_TEXTS = [
    "don't I'm we'll they're you've he'd it's", "DON'T I'M WE'LL THEY'RE", "'s 'S 'x '", "rock'n'roll",
    "1 12 123 1234 12345 1234567", "3.14159, -42, +7, 1e10", "١٢٣ ४५६ ½ Ⅻ ⑫", "abab xyz  xyz   xyz",
    "a\n\nb", "  \n  \n  x", "\r\n\r\nend", "x  \t  y", " \t\n", "end\n", "end  ", "\n", "\t\ta",
    "...!!!???", "$+<=>^~|", "a+b=c<d>e", "«quotes» “curly” — dash", "<|im_start|>user\nhi<|im_end|>",
    "<user> typed <user>", "e\u0301 combining", "안녕하세요 세계", "สวัสดีครับ", "مرحبا بالعالم",
    "bad \udcff byte \udc80", "\u00a0no-break\u2003em\u3000ideographic", "tab\x0bvt\x0cff\x1cfs",
    "The café costs €3.50!", "__init__(self, *args) -> None:", "ab" * 200 + " 1" * 100,
]
