//! The scanners. One cheap byte pass computes [`Features`] of the input; only
//! detectors whose features are present run, so clean text costs one table
//! lookup per byte. Validation (Luhn, mod-97, SSN area rules, JSON headers)
//! happens only on candidates.

use std::net::Ipv6Addr;
use std::sync::LazyLock;

use base64::Engine as _;
use regex::Regex;

use crate::Detector;

/// A raw detection: byte span and detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found {
    pub detector: Detector,
    pub start: usize,
    pub end: usize,
}

/// Bit set of enabled detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Mask(u16);

impl Mask {
    pub fn of(detectors: &[Detector]) -> Self {
        Mask(detectors.iter().fold(0, |m, d| m | d.bit()))
    }
    pub fn single(d: Detector) -> Self {
        Mask(d.bit())
    }
    fn has(self, d: Detector) -> bool {
        self.0 & d.bit() != 0
    }
    fn any(self, ds: &[Detector]) -> bool {
        ds.iter().any(|d| self.has(*d))
    }
}

impl Detector {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

// Byte classes.
const DIGIT: u8 = 1;
const UPPER: u8 = 2;
const LOWER: u8 = 4;
/// base64 / base64url alphabet (without '=' padding).
const TOKEN: u8 = 8;
/// A byte that may start a key prefix (`_` inside `sk_live_`, `AKIA`,
/// `xox…`, `glpat-`, `-----BEGIN`) or a JWT (`eyJ`).
const HINT: u8 = 16;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        if b.is_ascii_digit() {
            c |= DIGIT | TOKEN;
        }
        if b.is_ascii_uppercase() {
            c |= UPPER | TOKEN;
        }
        if b.is_ascii_lowercase() {
            c |= LOWER | TOKEN;
        }
        if b == b'+' || b == b'/' || b == b'_' || b == b'-' {
            c |= TOKEN;
        }
        if matches!(b, b'_' | b'A' | b'x' | b'g' | b'-' | b'e') {
            c |= HINT;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_token(b: u8) -> bool {
    CLASS[b as usize] & TOKEN != 0
}

/// What a string contains, from one pass over its bytes.
#[derive(Debug, Default)]
struct Features {
    digits: usize,
    at: bool,
    colons: usize,
    dashes: usize,
    upper: bool,
    max_token_run: usize,
    /// Saw `[A-Z][A-Z][0-9][0-9]` (an IBAN's country and check digits).
    iban_hint: bool,
    /// Saw a byte sequence every key prefix of [`KEY_RE`] contains.
    key_hint: bool,
    /// Saw `-----BEGIN`.
    pem_hint: bool,
    /// Saw `eyJ` (a JWT header).
    jwt_hint: bool,
}

fn features(s: &[u8]) -> Features {
    let mut f = Features::default();
    let mut run = 0usize;
    let mut classes = 0u8;
    for (i, &b) in s.iter().enumerate() {
        let c = CLASS[b as usize];
        classes |= c;
        if c & DIGIT != 0 {
            f.digits += 1;
            f.iban_hint = f.iban_hint
                || (i >= 3
                    && s[i - 1].is_ascii_digit()
                    && s[i - 2].is_ascii_uppercase()
                    && s[i - 3].is_ascii_uppercase());
        }
        if c & TOKEN != 0 {
            run += 1;
            if run > f.max_token_run {
                f.max_token_run = run;
            }
        } else {
            run = 0;
            match b {
                b'@' => f.at = true,
                b':' => f.colons += 1,
                _ => {}
            }
        }
        f.dashes += usize::from(b == b'-');
        if c & HINT != 0 {
            let rest = &s[i..];
            match b {
                b'_' => f.key_hint = true,
                b'A' => {
                    f.key_hint |= rest.starts_with(b"AKIA")
                        || rest.starts_with(b"ASIA")
                        || rest.starts_with(b"AIza");
                }
                b'x' => f.key_hint |= rest.starts_with(b"xox"),
                b'g' => f.key_hint |= rest.starts_with(b"glpat-"),
                b'-' => f.pem_hint |= rest.starts_with(b"-----BEGIN"),
                _ => f.jwt_hint |= rest.starts_with(b"eyJ"),
            }
        }
    }
    f.upper = classes & UPPER != 0;
    f
}

/// Runs every enabled detector over `s`, appending raw (possibly overlapping)
/// detections to `out`, then resolves overlaps: the earliest start wins, then
/// the longest span.
pub(crate) fn scan(s: &str, mask: Mask, out: &mut Vec<Found>) {
    let b = s.as_bytes();
    let f = features(b);
    let first = out.len();
    if f.at && mask.has(Detector::Email) {
        scan_email(b, out);
    }
    if f.digits >= 4
        && mask.any(&[
            Detector::Phone,
            Detector::Card,
            Detector::Ssn,
            Detector::Ipv4,
        ])
    {
        scan_numeric(b, mask, out);
    }
    if f.colons >= 2 && mask.has(Detector::Ipv6) {
        scan_ipv6(b, out);
    }
    if f.iban_hint && f.upper && b.len() >= 15 && mask.has(Detector::Iban) {
        scan_iban(s, out);
    }
    if mask.has(Detector::ApiKey) {
        if (f.key_hint && f.max_token_run >= 15) || (f.pem_hint && f.dashes >= 10 && b.len() >= 60)
        {
            scan_key_prefixes(s, out);
        }
        if f.max_token_run >= ENTROPY_MIN_LEN {
            scan_entropy(b, out);
        }
    }
    if f.jwt_hint && f.max_token_run >= 10 && mask.has(Detector::Jwt) {
        scan_jwt(b, out);
    }
    resolve(out, first);
}

fn resolve(out: &mut Vec<Found>, first: usize) {
    if out.len() - first <= 1 {
        return;
    }
    out[first..].sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut keep = first;
    let mut last_end = 0usize;
    for i in first..out.len() {
        let m = out[i];
        if keep > first && m.start < last_end {
            continue;
        }
        out[keep] = m;
        keep += 1;
        last_end = m.end;
    }
    out.truncate(keep);
}

// ---------------------------------------------------------------- email

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}

fn scan_email(s: &[u8], out: &mut Vec<Found>) {
    let mut last_end = 0;
    for at in memchr::memchr_iter(b'@', s) {
        if at < last_end {
            continue;
        }
        let mut l = at;
        while l > last_end && is_local(s[l - 1]) {
            l -= 1;
        }
        let mut r = at + 1;
        while r < s.len() && is_domain(s[r]) {
            r += 1;
        }
        // A sentence may end right after the address.
        while r > at + 1 && matches!(s[r - 1], b'.' | b'-') {
            r -= 1;
        }
        if valid_local(&s[l..at]) && valid_domain(&s[at + 1..r]) {
            out.push(Found {
                detector: Detector::Email,
                start: l,
                end: r,
            });
            last_end = r;
        }
    }
}

fn valid_local(l: &[u8]) -> bool {
    !l.is_empty()
        && l.len() <= 64
        && l[0] != b'.'
        && l[l.len() - 1] != b'.'
        && !l.windows(2).any(|w| w == b"..")
}

fn valid_domain(d: &[u8]) -> bool {
    if d.len() < 4 || d.len() > 253 {
        return false;
    }
    let mut labels = 0;
    let mut tld: &[u8] = &[];
    for label in d.split(|&b| b == b'.') {
        if label.is_empty()
            || label.len() > 63
            || label[0] == b'-'
            || label[label.len() - 1] == b'-'
        {
            return false;
        }
        labels += 1;
        tld = label;
    }
    labels >= 2 && tld.len() >= 2 && tld.iter().all(u8::is_ascii_alphabetic)
}

// ---------------------------------------------------------------- numbers

/// A run of digits inside a numeric run; `sep` is the byte span between the
/// previous group and this one (empty for the first group).
#[derive(Debug, Clone, Copy)]
struct Group {
    start: usize,
    end: usize,
    sep_start: usize,
}

impl Group {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

fn is_sep(b: u8) -> bool {
    matches!(b, b' ' | b'-' | b'.' | b'/' | b'(' | b')')
}

/// Skips a stretch glued to a word (`ORD-2024-0001`, `v1.2.3.4`): word
/// characters, and `.`/`-`/`/` between word characters.
fn skip_glued(s: &[u8], mut i: usize) -> usize {
    loop {
        while i < s.len() && is_word(s[i]) {
            i += 1;
        }
        if i + 1 < s.len() && matches!(s[i], b'.' | b'-' | b'/') && is_word(s[i + 1]) {
            i += 1;
            continue;
        }
        return i;
    }
}

/// Numeric runs: digit groups joined by 1–3 separator bytes from ` -./()`.
/// Phone numbers, cards, SSNs and IPv4 addresses are windows of consecutive
/// groups of a run; each is tried greedily left to right, longest first.
fn scan_numeric(s: &[u8], mask: Mask, out: &mut Vec<Found>) {
    let n = s.len();
    let mut groups: Vec<Group> = Vec::new();
    let mut i = 0;
    while i < n {
        if !s[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let prev = if i > 0 { s[i - 1] } else { b' ' };
        let prev2 = if i > 1 { s[i - 2] } else { b' ' };
        if is_word(prev) || (matches!(prev, b'.' | b'-' | b'/') && is_word(prev2)) {
            i = skip_glued(s, i);
            continue;
        }
        let prefix = match prev {
            b'+' | b'(' if i < 2 || !is_word(prev2) => Some(i - 1),
            _ => None,
        };
        groups.clear();
        let mut pos = i;
        let mut sep_start = i;
        loop {
            let gs = pos;
            while pos < n && s[pos].is_ascii_digit() {
                pos += 1;
            }
            groups.push(Group {
                start: gs,
                end: pos,
                sep_start,
            });
            let mut k = pos;
            while k < n && k - pos < 3 && is_sep(s[k]) {
                k += 1;
            }
            if k > pos && k < n && s[k].is_ascii_digit() {
                sep_start = pos;
                pos = k;
            } else {
                break;
            }
        }
        let end = pos;
        let mut next = end;
        if end < n && is_word(s[end]) {
            // The last group is glued to a word (`1234abc`): not a boundary.
            groups.pop();
            next = skip_glued(s, end);
        }
        // Fewer than 4 digits, or a lone short group, can't be anything.
        let digits: usize = groups.iter().map(Group::len).sum();
        if digits >= 4 && (groups.len() > 1 || digits >= 8) {
            windows(s, &groups, prefix, mask, out);
        }
        i = next.max(i + 1);
    }
}

fn windows(s: &[u8], groups: &[Group], prefix: Option<usize>, mask: Mask, out: &mut Vec<Found>) {
    let n = groups.len();
    let soft = |gi: usize| -> bool {
        // Is the boundary before group `gi` a soft one (start, or contains a space)?
        gi == 0 || gi == n || s[groups[gi].sep_start..groups[gi].start].contains(&b' ')
    };
    let mut gi = 0;
    while gi < n {
        if !soft(gi) {
            gi += 1;
            continue;
        }
        let pre = if gi == 0 {
            prefix.map(|p| s[p])
        } else if s[groups[gi].start - 1] == b'(' {
            Some(b'(')
        } else {
            None
        };
        let mut hit = None;
        for j in (gi + 1..=n.min(gi + 7)).rev() {
            if !soft(j) {
                continue;
            }
            let w = &groups[gi..j];
            let det = if mask.has(Detector::Ipv4) && pre.is_none() && is_ipv4_window(s, w) {
                Some(Detector::Ipv4)
            } else if mask.has(Detector::Ssn) && pre.is_none() && is_ssn_window(s, w) {
                Some(Detector::Ssn)
            } else if mask.has(Detector::Card) && pre.is_none() && is_card_window(s, w) {
                Some(Detector::Card)
            } else if mask.has(Detector::Phone) && is_phone_window(s, w, pre) {
                Some(Detector::Phone)
            } else {
                None
            };
            if let Some(d) = det {
                let start = if d == Detector::Phone && pre.is_some() {
                    w[0].start - 1
                } else {
                    w[0].start
                };
                hit = Some((
                    j,
                    Found {
                        detector: d,
                        start,
                        end: w[w.len() - 1].end,
                    },
                ));
                break;
            }
        }
        match hit {
            Some((j, f)) => {
                out.push(f);
                gi = j;
            }
            None => gi += 1,
        }
    }
}

fn sep<'a>(s: &'a [u8], g: &Group) -> &'a [u8] {
    &s[g.sep_start..g.start]
}

fn digits_of<'a>(s: &'a [u8], w: &'a [Group]) -> impl DoubleEndedIterator<Item = u8> + 'a {
    w.iter()
        .flat_map(move |g| s[g.start..g.end].iter().map(|b| b - b'0'))
}

fn is_ipv4_window(s: &[u8], w: &[Group]) -> bool {
    w.len() == 4
        && w.iter().enumerate().all(|(i, g)| {
            let d = &s[g.start..g.end];
            (i == 0 || sep(s, g) == b".")
                && (1..=3).contains(&d.len())
                && (d.len() == 1 || d[0] != b'0')
                && d.iter().fold(0u32, |a, b| a * 10 + u32::from(b - b'0')) <= 255
        })
}

fn is_ssn_window(s: &[u8], w: &[Group]) -> bool {
    if w.len() != 3 || w[0].len() != 3 || w[1].len() != 2 || w[2].len() != 4 {
        return false;
    }
    let (s1, s2) = (sep(s, &w[1]), sep(s, &w[2]));
    if s1 != s2 || !(s1 == b"-" || s1 == b" ") {
        return false;
    }
    valid_ssn(
        &s[w[0].start..w[0].end],
        &s[w[1].start..w[1].end],
        &s[w[2].start..w[2].end],
    )
}

/// SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000; and
/// the famous advertising number 078-05-1120.
pub(crate) fn valid_ssn(area: &[u8], group: &[u8], serial: &[u8]) -> bool {
    area != b"000"
        && area != b"666"
        && area[0] != b'9'
        && group != b"00"
        && serial != b"0000"
        && !(area == b"078" && group == b"05" && serial == b"1120")
}

fn is_card_window(s: &[u8], w: &[Group]) -> bool {
    let total: usize = w.iter().map(Group::len).sum();
    if !(13..=19).contains(&total) {
        return false;
    }
    if w.len() > 1 {
        let first_sep = sep(s, &w[1]);
        if !(first_sep == b" " || first_sep == b"-") {
            return false;
        }
        if w[1..].iter().any(|g| sep(s, g) != first_sep)
            || w.iter().any(|g| !(3..=6).contains(&g.len()))
        {
            return false;
        }
    }
    // Major networks start with 2–6 (Mastercard 2-series, Amex/Diners/JCB,
    // Visa, Mastercard/Maestro, Discover/UnionPay).
    let first = s[w[0].start];
    (b'2'..=b'6').contains(&first) && luhn(digits_of(s, w))
}

/// Luhn checksum over decimal digits (values 0–9).
pub(crate) fn luhn(digits: impl DoubleEndedIterator<Item = u8>) -> bool {
    let mut sum = 0u32;
    let mut n = 0;
    for (i, d) in digits.rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
        n += 1;
    }
    n > 0 && sum.is_multiple_of(10)
}

fn is_phone_window(s: &[u8], w: &[Group], pre: Option<u8>) -> bool {
    let total: usize = w.iter().map(Group::len).sum();
    if w.len() > 7 {
        return false;
    }
    let mut lens_buf = [0usize; 7];
    for (l, g) in lens_buf.iter_mut().zip(w) {
        *l = g.len();
    }
    let lens = &lens_buf[..w.len()];
    let first = s[w[0].start];
    let seps_ok = |allowed: &[&[u8]]| w[1..].iter().all(|g| allowed.contains(&sep(s, g)));
    match pre {
        // E.164 with optional grouping: +<country><number>, 8–15 digits.
        Some(b'+') => {
            (8..=15).contains(&total)
                && first != b'0'
                && w[1..].iter().all(|g| !sep(s, g).contains(&b'/'))
        }
        // National with a parenthesised area code: (415) 555-0132, (020) 7946 0958.
        Some(b'(') => {
            w.len() >= 2
                && (2..=5).contains(&lens[0])
                && matches!(sep(s, &w[1]), b") " | b")" | b")-")
                && (10..=11).contains(&total)
                && w[2..]
                    .iter()
                    .all(|g| matches!(sep(s, g), b" " | b"-" | b"."))
        }
        Some(_) => false,
        None => {
            // US: 415-555-0132, 415.555.0132, 415 555 0132, 1-415-555-0132.
            let us = |o: usize| {
                let (a, x) = (s[w[o].start], s[w[o + 1].start]);
                lens[o..] == [3, 3, 4] && (b'2'..=b'9').contains(&a) && (b'2'..=b'9').contains(&x)
            };
            let uniform = |g: &[Group]| {
                let f = sep(s, &g[0]);
                matches!(f, b"-" | b"." | b" ") && g.iter().all(|x| sep(s, x) == f)
            };
            if w.len() == 3 && us(0) && uniform(&w[1..]) {
                return true;
            }
            if w.len() == 4 && lens[0] == 1 && first == b'1' && us(1) && uniform(&w[1..]) {
                return true;
            }
            // Trunk-prefixed national numbers (UK 020 7946 0958, 07911 123456;
            // India 098765 43210, 09876543210): 10–11 digits starting 0[1-9].
            if first == b'0'
                && (10..=11).contains(&total)
                && s[w[0].start + 1] != b'0'
                && w.len() <= 3
                && lens.iter().all(|l| *l >= 3)
                && seps_ok(&[b" ", b"-"])
            {
                return true;
            }
            // India mobile written 98765 43210.
            w.len() == 2 && *lens == [5, 5] && (b'6'..=b'9').contains(&first) && seps_ok(&[b" "])
        }
    }
}

// ---------------------------------------------------------------- IPv6

fn is_v6(b: u8) -> bool {
    b.is_ascii_hexdigit() || b == b':' || b == b'.'
}

fn scan_ipv6(s: &[u8], out: &mut Vec<Found>) {
    let n = s.len();
    let mut done = 0;
    // Only look around colons, which are rare in ordinary text.
    for colon in memchr::memchr_iter(b':', s) {
        if colon < done {
            continue;
        }
        let mut start = colon;
        while start > done && is_v6(s[start - 1]) {
            start -= 1;
        }
        let mut i = colon;
        while i < n && is_v6(s[i]) {
            i += 1;
        }
        done = i;
        if (start > 0 && is_word(s[start - 1])) || (i < n && is_word(s[i])) {
            continue;
        }
        let mut end = i;
        while end > start && s[end - 1] == b'.' {
            end -= 1;
        }
        let mut cand = &s[start..end];
        if cand.ends_with(b":") && !cand.ends_with(b"::") {
            cand = &cand[..cand.len() - 1];
        }
        if cand.iter().filter(|b| **b == b':').count() >= 2
            && cand.iter().any(u8::is_ascii_digit)
            && parse_ipv6(cand)
        {
            out.push(Found {
                detector: Detector::Ipv6,
                start,
                end: start + cand.len(),
            });
        }
    }
}

fn parse_ipv6(b: &[u8]) -> bool {
    std::str::from_utf8(b)
        .ok()
        .and_then(|t| t.parse::<Ipv6Addr>().ok())
        .is_some()
}

// ---------------------------------------------------------------- IBAN

static IBAN_RE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?-u:\b)").ok()
});

/// IBAN lengths by country (SWIFT registry).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NL", 18),
    (b"NO", 15),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"SA", 24),
    (b"SC", 31),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
];

fn scan_iban(s: &str, out: &mut Vec<Found>) {
    let Some(re) = IBAN_RE.as_ref() else { return };
    let b = s.as_bytes();
    for m in re.find_iter(s) {
        if let Some(end) = iban_prefix_end(&b[m.start()..m.end()]) {
            out.push(Found {
                detector: Detector::Iban,
                start: m.start(),
                end: m.start() + end,
            });
        }
    }
}

/// The candidate may have swallowed trailing groups; the country's length
/// says where the IBAN ends. Returns the byte length of the valid IBAN.
fn iban_prefix_end(c: &[u8]) -> Option<usize> {
    let len = IBAN_LENGTHS.iter().find(|(cc, _)| c.starts_with(*cc))?.1;
    let mut compact = Vec::with_capacity(len);
    let mut end = 0;
    for (i, &b) in c.iter().enumerate() {
        if b == b' ' {
            continue;
        }
        compact.push(b);
        if compact.len() == len {
            end = i + 1;
            break;
        }
    }
    if compact.len() != len || (end < c.len() && c[end] != b' ') {
        return None;
    }
    iban_checksum(&compact).then_some(end)
}

/// ISO 13616 mod-97 check on a compact, uppercase IBAN.
pub(crate) fn iban_checksum(iban: &[u8]) -> bool {
    if iban.len() < 5 {
        return false;
    }
    let mut rem = 0u32;
    for &b in iban[4..].iter().chain(&iban[..4]) {
        rem = match b {
            b'0'..=b'9' => (rem * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(b - b'A' + 10)) % 97,
            _ => return false,
        };
    }
    rem == 1
}

/// Validates a whole string as an IBAN (spaces allowed).
pub(crate) fn is_iban_str(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    IBAN_LENGTHS
        .iter()
        .any(|(cc, len)| compact.starts_with(*cc) && compact.len() == *len)
        && compact[2..4].iter().all(u8::is_ascii_digit)
        && iban_checksum(&compact)
}

// ---------------------------------------------------------------- API keys

static KEY_RE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?-u:\b)(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}",
        r"|(?-u:\b)gh[pousr]_[0-9A-Za-z]{30,}",
        r"|(?-u:\b)github_pat_[0-9A-Za-z_]{22,}",
        r"|(?-u:\b)xox[bpas]-[0-9A-Za-z-]{10,}",
        r"|(?-u:\b)(?:AKIA|ASIA)[0-9A-Z]{16}(?-u:\b)",
        r"|(?-u:\b)AIza[0-9A-Za-z_-]{35}",
        r"|(?-u:\b)glpat-[0-9A-Za-z_-]{20,}",
        r"|-----BEGIN[A-Z ]*PRIVATE KEY-----(?s:.)*?-----END[A-Z ]*PRIVATE KEY-----",
    ))
    .ok()
});

fn scan_key_prefixes(s: &str, out: &mut Vec<Found>) {
    let Some(re) = KEY_RE.as_ref() else { return };
    out.extend(re.find_iter(s).map(|m| Found {
        detector: Detector::ApiKey,
        start: m.start(),
        end: m.end(),
    }));
}

/// Minimum length of a high-entropy token.
pub const ENTROPY_MIN_LEN: usize = 20;
/// Shannon entropy threshold (bits per character) for base64-alphabet tokens.
pub const ENTROPY_BASE64_BITS: f64 = 3.5;
/// Shannon entropy threshold (bits per character) for hex tokens.
pub const ENTROPY_HEX_BITS: f64 = 3.0;

fn scan_entropy(s: &[u8], out: &mut Vec<Found>) {
    let n = s.len();
    let mut i = 0;
    while i < n {
        if !is_token(s[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && is_token(s[i]) {
            i += 1;
        }
        let mut end = i;
        while end < n && s[end] == b'=' && end - i < 2 {
            end += 1;
        }
        let glued = (start > 0 && (s[start - 1] == b'=' || s[start - 1] == b'\\'))
            || (end < n && (is_word(s[end]) || s[end] == b'='));
        if !glued && high_entropy_token(&s[start..i]) {
            out.push(Found {
                detector: Detector::ApiKey,
                start,
                end,
            });
        }
        i = end.max(i);
    }
}

/// The high-entropy rule. A token (base64/base64url alphabet, at least
/// [`ENTROPY_MIN_LEN`] characters) is a secret when either
/// - it mixes digits, upper- and lowercase letters, has Shannon entropy of
///   at least [`ENTROPY_BASE64_BITS`] bits/char, no run of 8+ lowercase
///   letters (words, identifiers) and does not start with `/` (paths); or
/// - it is hex of 32+ characters mixing digits and letters with entropy of at
///   least [`ENTROPY_HEX_BITS`] bits/char, and is not 40 or 64 characters
///   long (SHA-1/SHA-256 digests and git ids are identifiers, not secrets).
///
/// UUIDs are never secrets.
pub fn high_entropy_token(t: &[u8]) -> bool {
    if t.len() < ENTROPY_MIN_LEN || t[0] == b'/' || is_uuid(t) {
        return false;
    }
    let mut classes = 0u8;
    let mut hex = true;
    let mut lower_run = 0usize;
    let mut max_lower_run = 0usize;
    for &b in t {
        classes |= CLASS[b as usize];
        hex &= b.is_ascii_hexdigit();
        if b.is_ascii_lowercase() {
            lower_run += 1;
            max_lower_run = max_lower_run.max(lower_run);
        } else {
            lower_run = 0;
        }
    }
    let has = |c: u8| classes & c != 0;
    if hex {
        let uniform_case = !(has(UPPER) && has(LOWER));
        return t.len() >= 32
            && t.len() != 40
            && t.len() != 64
            && uniform_case
            && has(DIGIT)
            && (has(UPPER) || has(LOWER))
            && shannon(t) >= ENTROPY_HEX_BITS;
    }
    has(DIGIT) && has(UPPER) && has(LOWER) && max_lower_run < 8 && shannon(t) >= ENTROPY_BASE64_BITS
}

fn is_uuid(t: &[u8]) -> bool {
    t.len() == 36
        && t.iter().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

/// Shannon entropy in bits per byte.
pub fn shannon(t: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in t {
        counts[b as usize] += 1;
    }
    let n = t.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

// ---------------------------------------------------------------- JWT

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn scan_jwt(s: &[u8], out: &mut Vec<Found>) {
    let mut from = 0;
    while let Some(off) = memchr::memmem::find(&s[from..], b"eyJ") {
        let start = from + off;
        from = start + 3;
        if start > 0 && (is_b64url(s[start - 1]) || s[start - 1] == b'.') {
            continue;
        }
        if let Some(end) = jwt_end(s, start) {
            out.push(Found {
                detector: Detector::Jwt,
                start,
                end,
            });
            from = end;
        }
    }
}

fn jwt_end(s: &[u8], start: usize) -> Option<usize> {
    let seg = |mut i: usize| {
        let b = i;
        while i < s.len() && is_b64url(s[i]) {
            i += 1;
        }
        (b, i)
    };
    let (h0, h1) = seg(start);
    if h1 - h0 < 10 || s.get(h1) != Some(&b'.') {
        return None;
    }
    let (p0, p1) = seg(h1 + 1);
    if p1 == p0 || s.get(p1) != Some(&b'.') {
        return None;
    }
    let (_, sig_end) = seg(p1 + 1);
    if sig_end < s.len() && (s[sig_end] == b'.' || s[sig_end] == b'=') {
        return None;
    }
    jwt_header_ok(&s[h0..h1]).then_some(sig_end)
}

fn jwt_header_ok(h: &[u8]) -> bool {
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&json)
        .is_ok_and(|m| m.get("alg").is_some_and(serde_json::Value::is_string))
}
