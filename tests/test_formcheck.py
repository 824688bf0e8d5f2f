"""Policy 6.6: spotting a school email address in a form, keeping only its domain."""

from __future__ import annotations

import pytest

from filterd import formcheck

SCHOOL = formcheck.pattern(["school.example", "Staff.School.Example"])


@pytest.mark.parametrize(
    "body, domain",
    [
        (b"email=j.smith%40school.example&password=x", "school.example"),
        (b"email=J.Smith%40SCHOOL.EXAMPLE&pw=1", "school.example"),
        (b'{"email": "jsmith@school.example", "password": "x"}', "school.example"),
        (b'{"email":"jsmith\\u0040school.example"}', "school.example"),
        (b"--b\r\nContent-Disposition: form-data; name=\"e\"\r\n\r\nt@staff.school.example\r\n--b--",
         "staff.school.example"),
        (b"email=jsmith%40gmail.com", None),
        (b"email=jsmith%40school.example.evil.com", None),  # only ends like a school address
        (b"email=jsmith%40notschool.example", None),
        (b"email=jsmith%40myschool.example", None),
        (b"", None),
    ],
)
def test_school_email_in(body: bytes, domain: str | None) -> None:
    assert formcheck.school_email_in(body, SCHOOL) == domain


def test_no_domains_means_no_check() -> None:
    assert formcheck.pattern([]) is None
    assert formcheck.school_email_in(b"a%40school.example", None) is None


def test_large_uploads_are_not_searched() -> None:
    body = b"x" * formcheck.MAX_BODY + b"a@school.example"
    assert formcheck.school_email_in(body, SCHOOL) is None


def test_domains_from_directory() -> None:
    assert formcheck.domains_from_directory(["a@School.Example", None, "b@school.example", "bad"]) == ["school.example"]
