"""Hypothesis strategies for hostile input, shared by the library and app fuzz tests (not a test module)."""

from __future__ import annotations

from hypothesis import strategies as st

HOSTILE = st.one_of(
    st.text(max_size=80),  # every unicode category, surrogates excluded by hypothesis
    st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\x00abc\x00",
            "\u202eevil\u202c",
            "שלום עולם",
            "مرحبا",
            "👩‍👩‍👧‍👦🔥" * 5,
            "\r\n\t\x0b\x0c",
            "<script>alert(1)</script>",
            "a" * 400,
            "\ufeff",
            "e\u0301" * 30,
        ]
    ),
)
