//! Secrets never appear in what bakery shows: provisioner output, logs, events, manifests, error
//! messages. Values resolved from Secrets Manager are registered with a [`Redactor`]; every byte
//! of provisioner output passes through a [`LineRedactor`] before it is printed, logged or kept
//! for an error message, and [`Redactor::redact`] cleans single texts.
//!
//! A secret is caught as printed, split across lines (`fold`, a wrapped base64 block, a PEM key
//! printed as it is: line breaks are ignored when matching), base64-encoded (standard or URL-safe
//! alphabet, at any alignment inside a longer encoding), hex-encoded (either case), JSON-escaped
//! and URL-encoded in any of the usual ways (`quote`, `quote_plus`, upper- or lowercase escapes,
//! partly escaped).
//!
//! Output handling is linear in the size of the output and needs memory for one shown line
//! ([`MAX_LINE_BYTES`]) plus a window the length of the longest secret form: the matcher is an
//! Aho-Corasick automaton stepped byte by byte over two views of the stream (the bytes without
//! line breaks, and the same percent-decoded). A line is held back only until enough output
//! follows it to rule out a secret continuing into what comes next; blank lines are passed on as
//! soon as every line before them has been. A line longer than [`MAX_LINE_BYTES`] is shown cut,
//! with a note saying so; the rest is still read and matched, so a secret across the cut is
//! masked in the part shown.
//!
//! Both halves are pure: the `bakery` crate owns the pipes and the locks around them
//! ([`SharedRedactor`] and [`OutputRedactor`] fail closed: a poisoned lock hides output instead of
//! showing it unredacted).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::dfa::DFA;
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{AhoCorasick, Anchored, MatchKind};
use base64::Engine;
use serde::Serialize;

use crate::recipe::template::{parse_reference, Reference};

/// What a redacted stretch of output is replaced with.
pub const MASK: &str = "[REDACTED]";
/// Shorter values are not redacted as substrings: masking every "1" or "ab" in the output would
/// destroy it without protecting anything.
pub const MIN_SECRET_LEN: usize = 4;
/// Bytes of one output line shown; the rest of a longer line is read (and matched) but not shown.
/// Long enough for any line a person reads, short enough that a 50 MiB line without a newline
/// costs no more memory than this.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// A value that must not be shown: `Debug` and `Display` print a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(v: impl Into<String>) -> Self {
        Self(v.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

// ------------------------------------------------------------------------------------------
// The forms of a secret

/// The value without line breaks: how it looks in the stream view, which ignores them.
fn canonical(b: &[u8]) -> Vec<u8> {
    b.iter()
        .copied()
        .filter(|c| !matches!(c, b'\r' | b'\n'))
        .collect()
}

/// `+` and space are one symbol in the percent-decoded view (`quote_plus` writes a space as `+`).
fn plus_as_space(b: u8) -> u8 {
    if b == b'+' {
        b' '
    } else {
        b
    }
}

fn hex(b: &[u8], upper: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    b.iter()
        .flat_map(|x| [digits[usize::from(x >> 4)], digits[usize::from(x & 15)]])
        .collect()
}

/// Substrings of base64 output that appear whenever `secret` is encoded, wherever it starts in
/// the encoded data: one per alignment (0, 1 or 2 bytes before it), without the characters at
/// each end that also depend on the neighbouring bytes; in the standard and URL-safe alphabets.
fn base64_forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = Vec::new();
    for offset in 0..3usize {
        let mut data = vec![0u8; offset];
        data.extend_from_slice(secret);
        let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&data);
        // Characters fully determined by the secret: skip those covering the padding prefix.
        let start = (offset * 8).div_ceil(6);
        let end = ((offset + secret.len()) * 8) / 6;
        if end > start + MIN_SECRET_LEN {
            let core = &encoded.as_bytes()[start..end];
            forms.push(core.to_vec());
            forms.push(
                core.iter()
                    .map(|c| match c {
                        b'+' => b'-',
                        b'/' => b'_',
                        c => *c,
                    })
                    .collect(),
            );
        }
    }
    forms
}

/// The needles of one secret: matched in the stream view, and in the percent-decoded view.
fn forms(secret: &str) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut raw = Vec::new();
    let mut decoded = Vec::new();
    let mut variants = vec![secret];
    // `$(cat key)` drops a trailing newline the secret has: its encodings then differ at the end.
    if secret.trim_end() != secret {
        variants.push(secret.trim_end());
    }
    for v in variants {
        let b = v.as_bytes();
        let c = canonical(b);
        decoded.push(c.iter().copied().map(plus_as_space).collect());
        raw.push(c);
        raw.push(hex(b, false));
        raw.push(hex(b, true));
        raw.extend(base64_forms(b));
        if let Ok(json) = serde_json::to_string(v) {
            let escaped = json.as_bytes()[1..json.len() - 1].to_vec();
            if escaped != b {
                raw.push(escaped);
            }
        }
    }
    let keep = |v: &mut Vec<Vec<u8>>| {
        v.retain(|n| n.len() >= MIN_SECRET_LEN);
        v.sort();
        v.dedup();
    };
    keep(&mut raw);
    keep(&mut decoded);
    (raw, decoded)
}

// ------------------------------------------------------------------------------------------
// The matcher

/// Total bytes of forms up to which a DFA is built: one table lookup a byte, but its size grows
/// with the forms (a 3 KiB PEM key: 18 MB); above, a contiguous NFA (a few hundred KB, about
/// half as fast).
const DFA_MAX_FORM_BYTES: usize = 8 * 1024;

/// An Aho-Corasick automaton stepped byte by byte.
enum Machine {
    Dfa(DFA),
    Nfa(NFA),
}

impl Machine {
    fn build(patterns: &[Vec<u8>]) -> Option<Self> {
        let total: usize = patterns.iter().map(Vec::len).sum();
        if total <= DFA_MAX_FORM_BYTES {
            DFA::builder()
                .match_kind(MatchKind::Standard)
                .byte_classes(true)
                .build(patterns)
                .ok()
                .map(Self::Dfa)
        } else {
            NFA::builder()
                .match_kind(MatchKind::Standard)
                .build(patterns)
                .ok()
                .map(Self::Nfa)
        }
    }

    fn start(&self) -> StateID {
        match self {
            Self::Dfa(a) => a.start_state(Anchored::No),
            Self::Nfa(a) => a.start_state(Anchored::No),
        }
        .unwrap_or_default()
    }

    /// The next state, and the length of the longest form ending here (0: none).
    #[inline]
    fn step(&self, sid: StateID, b: u8) -> (StateID, usize) {
        fn go<A: Automaton>(a: &A, sid: StateID, b: u8) -> (StateID, usize) {
            let next = a.next_state(Anchored::No, sid, b);
            if a.is_special(next) && a.is_match(next) {
                let longest = (0..a.match_len(next))
                    .map(|i| a.pattern_len(a.match_pattern(next, i)))
                    .max()
                    .unwrap_or(0);
                (next, longest)
            } else {
                (next, 0)
            }
        }
        match self {
            Self::Dfa(a) => go(a, sid, b),
            Self::Nfa(a) => go(a, sid, b),
        }
    }
}

/// The automata of every registered form.
struct Matcher {
    /// Forms matched in the stream view (the output without `\r` and `\n`).
    raw: Machine,
    /// Plain values matched in the percent-decoded stream view.
    decoded: Machine,
    raw_max: usize,
    decoded_max: usize,
}

impl Matcher {
    fn build(raw: &[Vec<u8>], decoded: &[Vec<u8>]) -> Option<Self> {
        Some(Self {
            raw: Machine::build(raw)?,
            decoded: Machine::build(decoded)?,
            raw_max: raw.iter().map(Vec::len).max().unwrap_or(0),
            decoded_max: decoded.iter().map(Vec::len).max().unwrap_or(0),
        })
    }

    /// The most stream-view bytes one match can cover (a decoded byte is at most 3, `%HH`).
    fn span(&self) -> usize {
        self.raw_max.max(3 * self.decoded_max)
    }
}

/// Every registered secret, in every form output may carry.
#[derive(Clone, Default)]
pub struct Redactor {
    values: Vec<String>,
    raw: Vec<Vec<u8>>,
    decoded: Vec<Vec<u8>>,
    matcher: Option<Arc<Matcher>>,
    /// Fail closed: hide every line (a lock around the real redactor was poisoned).
    everything: bool,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.values.len())
            .field("everything", &self.everything)
            .finish()
    }
}

impl Redactor {
    /// Registers a secret value (values shorter than [`MIN_SECRET_LEN`] are not matched).
    pub fn add(&mut self, secret: &str) {
        if secret.len() < MIN_SECRET_LEN || self.values.iter().any(|v| v == secret) {
            return;
        }
        self.values.push(secret.to_string());
        let (raw, decoded) = forms(secret);
        self.raw.extend(raw);
        self.decoded.extend(decoded);
        self.matcher = Matcher::build(&self.raw, &self.decoded).map(Arc::new);
        if self.matcher.is_none() {
            // Cannot happen with byte patterns this size; if it did, hide everything.
            self.everything = true;
        }
    }

    /// A redactor that hides every non-blank line: what is shown when the real one is lost.
    pub fn everything() -> Self {
        Self {
            everything: true,
            ..Self::default()
        }
    }

    /// True when nothing is hidden.
    pub fn is_empty(&self) -> bool {
        self.matcher.is_none() && !self.everything
    }

    /// The registered values (for the SSM communicator, which must never send them).
    pub fn values(&self) -> &[String] {
        &self.values
    }

    /// Redacts one self-contained text (an error message, a single value). Line breaks inside
    /// a masked stretch are masked with it.
    pub fn redact(&self, text: &str) -> String {
        if self.everything && !text.is_empty() {
            return MASK.to_string();
        }
        let Some(m) = &self.matcher else {
            return text.to_string();
        };
        let mut masks = Masks::default();
        let mut scanner = Scanner::new(m.clone());
        for (o, &b) in text.as_bytes().iter().enumerate() {
            if !matches!(b, b'\r' | b'\n') {
                scanner.feed(b, o as u64, &mut masks);
            }
        }
        scanner.finish(&mut masks);
        let mut out = Vec::with_capacity(text.len());
        let mut at = 0usize;
        for &(s, e) in &masks.0 {
            let (s, e) = (s as usize, (e as usize).min(text.len()));
            out.extend_from_slice(&text.as_bytes()[at..s]);
            out.extend_from_slice(MASK.as_bytes());
            at = e;
        }
        out.extend_from_slice(&text.as_bytes()[at..]);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// True if `text` holds any form of any registered secret.
    pub fn finds_in(&self, text: &[u8]) -> bool {
        let Some(m) = &self.matcher else {
            return false;
        };
        let mut masks = Masks::default();
        let mut scanner = Scanner::new(m.clone());
        for (o, &b) in text.iter().enumerate() {
            if !matches!(b, b'\r' | b'\n') {
                scanner.feed(b, o as u64, &mut masks);
            }
        }
        scanner.finish(&mut masks);
        !masks.0.is_empty()
    }
}

/// Masked stretches of the output, as `[start, end)` byte offsets from the stream's start:
/// sorted, neither overlapping nor touching.
#[derive(Debug, Default)]
struct Masks(VecDeque<(u64, u64)>);

impl Masks {
    fn add(&mut self, mut s: u64, mut e: u64) {
        // Matches arrive in about the order they end: merge from the back.
        let mut after = Vec::new();
        while let Some(&(bs, be)) = self.0.back() {
            if bs > e {
                after.push((bs, be));
            } else if be < s {
                break;
            } else {
                s = s.min(bs);
                e = e.max(be);
            }
            self.0.pop_back();
        }
        self.0.push_back((s, e));
        self.0.extend(after.into_iter().rev());
    }
}

/// Where the percent decoder is inside an escape.
#[derive(Debug, Clone, Copy)]
enum Pct {
    Idle,
    /// After `%` (at this stream-view index).
    Percent(u64),
    /// After `%` and one hex digit.
    Digit(u64, u8),
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The automata's positions in one stream, and the recent offsets a match's start maps back to.
struct Scanner {
    m: Arc<Matcher>,
    raw_sid: StateID,
    decoded_sid: StateID,
    /// Stream-view bytes seen.
    seen: u64,
    /// Ring: the output offset of stream-view byte i is at `i & ring_mask`.
    offsets: Vec<u64>,
    ring_mask: u64,
    /// Decoded bytes seen.
    decoded: u64,
    /// Ring: the stream-view index where decoded byte k starts.
    starts: Vec<u64>,
    starts_mask: u64,
    pct: Pct,
}

impl Scanner {
    fn new(m: Arc<Matcher>) -> Self {
        let ring = (m.span() + 8).next_power_of_two();
        let starts = (m.decoded_max + 8).next_power_of_two();
        let raw_sid = m.raw.start();
        let decoded_sid = m.decoded.start();
        Self {
            raw_sid,
            decoded_sid,
            seen: 0,
            offsets: vec![0; ring],
            ring_mask: ring as u64 - 1,
            decoded: 0,
            starts: vec![0; starts],
            starts_mask: starts as u64 - 1,
            pct: Pct::Idle,
            m,
        }
    }

    fn offset(&self, i: u64) -> u64 {
        self.offsets[(i & self.ring_mask) as usize]
    }

    /// One stream-view byte (not `\r` or `\n`) at output offset `o`.
    #[inline]
    fn feed(&mut self, b: u8, o: u64, masks: &mut Masks) {
        let i = self.seen;
        self.offsets[(i & self.ring_mask) as usize] = o;
        self.seen += 1;
        let (sid, len) = self.m.raw.step(self.raw_sid, b);
        self.raw_sid = sid;
        if len > 0 {
            masks.add(self.offset(i + 1 - len as u64), o + 1);
        }
        match self.pct {
            Pct::Idle => self.plain(b, i, masks),
            Pct::Percent(at) => {
                if hex_value(b).is_some() {
                    self.pct = Pct::Digit(at, b);
                } else {
                    self.pct = Pct::Idle;
                    self.decoded_byte(b'%', at, at, masks);
                    self.plain(b, i, masks);
                }
            }
            Pct::Digit(at, hi) => {
                self.pct = Pct::Idle;
                match (hex_value(hi), hex_value(b)) {
                    (Some(h), Some(l)) => self.decoded_byte(h * 16 + l, at, i, masks),
                    _ => {
                        self.decoded_byte(b'%', at, at, masks);
                        self.decoded_byte(hi, at + 1, at + 1, masks);
                        self.plain(b, i, masks);
                    }
                }
            }
        }
    }

    /// A byte outside an escape: it starts one, or it is itself.
    #[inline]
    fn plain(&mut self, b: u8, i: u64, masks: &mut Masks) {
        if b == b'%' {
            self.pct = Pct::Percent(i);
        } else {
            self.decoded_byte(b, i, i, masks);
        }
    }

    /// One byte of the decoded view, from stream-view bytes `from..=to`.
    #[inline]
    fn decoded_byte(&mut self, d: u8, from: u64, to: u64, masks: &mut Masks) {
        if matches!(d, b'\r' | b'\n') {
            return;
        }
        let k = self.decoded;
        self.starts[(k & self.starts_mask) as usize] = from;
        self.decoded += 1;
        let (sid, len) = self.m.decoded.step(self.decoded_sid, plus_as_space(d));
        self.decoded_sid = sid;
        if len > 0 {
            let first = self.starts[((k + 1 - len as u64) & self.starts_mask) as usize];
            masks.add(self.offset(first), self.offset(to) + 1);
        }
    }

    /// The stream ended: an unfinished escape is its bytes.
    fn finish(&mut self, masks: &mut Masks) {
        match std::mem::replace(&mut self.pct, Pct::Idle) {
            Pct::Idle => {}
            Pct::Percent(at) => self.decoded_byte(b'%', at, at, masks),
            Pct::Digit(at, hi) => {
                self.decoded_byte(b'%', at, at, masks);
                self.decoded_byte(hi, at + 1, at + 1, masks);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Streams of output

/// One line of output, held until its masking is final.
#[derive(Debug, Default)]
struct Line {
    /// Offset of its first byte in the stream.
    start: u64,
    /// Its first [`MAX_LINE_BYTES`] bytes.
    shown: Vec<u8>,
    /// Its whole length (without the newline).
    len: u64,
    /// Stream-view index of its last byte that is neither `\r` nor `\n`.
    last: Option<u64>,
    /// Blank lines that came right after it (held with it, shown after it).
    blanks_after: u64,
}

/// Redacts a stream of output (one of a command's stdout or stderr) into lines to show. Takes
/// the output in pieces as it arrives (part of a line, several lines); gives back the lines now
/// safe to show, redacted, in order.
pub struct LineRedactor {
    scanner: Option<Scanner>,
    everything: bool,
    /// Stream-view bytes that must follow a line before its masking is final.
    horizon: u64,
    /// Bytes seen.
    at: u64,
    masks: Masks,
    held: VecDeque<Line>,
    current: Line,
}

impl fmt::Debug for LineRedactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineRedactor")
            .field("at", &self.at)
            .field("held", &self.held.len())
            .finish()
    }
}

impl LineRedactor {
    pub fn new(redactor: Redactor) -> Self {
        let scanner = redactor.matcher.clone().map(Scanner::new);
        // A match is found at most two bytes late (an escape being read).
        let horizon = redactor.matcher.as_ref().map_or(0, |m| m.span() as u64 + 2);
        Self {
            scanner,
            everything: redactor.everything,
            horizon,
            at: 0,
            masks: Masks::default(),
            held: VecDeque::new(),
            current: Line::default(),
        }
    }

    /// Takes the next piece of output; returns the lines now safe to show, redacted.
    pub fn push(&mut self, chunk: impl AsRef<[u8]>) -> Vec<String> {
        let mut out = Vec::new();
        for &b in chunk.as_ref() {
            let o = self.at;
            self.at += 1;
            if b == b'\n' {
                self.end_line(o + 1);
                self.release(&mut out, false);
                continue;
            }
            let line = &mut self.current;
            line.len += 1;
            if line.shown.len() < MAX_LINE_BYTES {
                line.shown.push(b);
            }
            if b == b'\r' {
                continue;
            }
            if let Some(scanner) = &mut self.scanner {
                line.last = Some(scanner.seen);
                scanner.feed(b, o, &mut self.masks);
                // A match wholly inside the cut-off part of a long line changes nothing shown.
                let shown_end = line.start + line.shown.len() as u64;
                if line.len > MAX_LINE_BYTES as u64
                    && self.masks.0.back().is_some_and(|&(s, _)| s >= shown_end)
                {
                    self.masks.0.pop_back();
                }
            }
        }
        self.release(&mut out, false);
        out
    }

    /// The stream ended: everything held back, redacted.
    pub fn finish(&mut self) -> Vec<String> {
        if let Some(scanner) = &mut self.scanner {
            scanner.finish(&mut self.masks);
        }
        if self.current.len > 0 {
            self.end_line(self.at);
        }
        let mut out = Vec::new();
        self.release(&mut out, true);
        out
    }

    /// The current line ended; the next starts at `next`.
    fn end_line(&mut self, next: u64) {
        let line = std::mem::replace(
            &mut self.current,
            Line {
                start: next,
                ..Line::default()
            },
        );
        match self.held.back_mut() {
            Some(back) if line.len == 0 => back.blanks_after += 1,
            _ => self.held.push_back(line),
        }
    }

    fn ready(&self, line: &Line) -> bool {
        let seen = self.scanner.as_ref().map_or(0, |s| s.seen);
        match line.last {
            None => true,
            Some(last) => seen - (last + 1) >= self.horizon,
        }
    }

    fn release(&mut self, out: &mut Vec<String>, all: bool) {
        while let Some(line) = self.held.front() {
            if !all && !self.ready(line) {
                break;
            }
            let Some(line) = self.held.pop_front() else {
                break;
            };
            out.push(self.render(&line));
            for _ in 0..line.blanks_after {
                out.push(String::new());
            }
        }
    }

    fn render(&mut self, line: &Line) -> String {
        let mut shown: &[u8] = &line.shown;
        let whole = line.len as usize == shown.len();
        if whole {
            while let [rest @ .., b'\r'] = shown {
                shown = rest;
            }
        }
        let mut text = if self.everything && !shown.is_empty() {
            MASK.to_string()
        } else {
            let end = line.start + shown.len() as u64;
            let mut out = Vec::with_capacity(shown.len());
            let mut at = line.start;
            for &(s, e) in &self.masks.0 {
                if s >= end {
                    break;
                }
                if e <= at {
                    continue;
                }
                let s = s.max(at);
                out.extend_from_slice(
                    &shown[(at - line.start) as usize..(s - line.start) as usize],
                );
                out.extend_from_slice(MASK.as_bytes());
                at = e.min(end);
            }
            out.extend_from_slice(&shown[(at - line.start) as usize..]);
            String::from_utf8_lossy(&out).into_owned()
        };
        if !whole {
            text.push_str(&format!(
                " [bakery: line cut: {} of its {} bytes shown]",
                line.shown.len(),
                line.len
            ));
        }
        // Masks that end within this line (and its newline) are done with.
        let next = line.start + line.len + 1;
        while self.masks.0.front().is_some_and(|&(_, e)| e <= next) {
            self.masks.0.pop_front();
        }
        text
    }
}

// ------------------------------------------------------------------------------------------
// Fail-closed sharing

/// The bake's redactor, set once its references are resolved, read by every output sink. A
/// poisoned lock (a thread panicked holding it) gives [`Redactor::everything`]: output is hidden,
/// never shown unredacted.
#[derive(Clone, Default)]
pub struct SharedRedactor(Arc<RwLock<Redactor>>);

impl fmt::Debug for SharedRedactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedRedactor")
    }
}

impl SharedRedactor {
    pub fn set(&self, redactor: Redactor) {
        let mut guard = self.0.write().unwrap_or_else(|p| p.into_inner());
        *guard = redactor;
    }

    pub fn get(&self) -> Redactor {
        match self.0.read() {
            Ok(r) => r.clone(),
            Err(_) => Redactor::everything(),
        }
    }
}

/// The two streams of one command (0 stdout, 1 stderr), each through its own [`LineRedactor`],
/// behind one lock the output callbacks share. A poisoned lock (a panic while redacting) hides
/// the rest of the output instead of showing it unredacted.
#[derive(Debug)]
pub struct OutputRedactor(Mutex<[LineRedactor; 2]>);

impl OutputRedactor {
    pub fn new(redactor: Redactor) -> Self {
        Self(Mutex::new([
            LineRedactor::new(redactor.clone()),
            LineRedactor::new(redactor),
        ]))
    }

    /// Output of stream `stream` (0 or 1); the lines now safe to show.
    pub fn push(&self, stream: usize, chunk: &[u8]) -> Vec<String> {
        match self.0.lock() {
            Ok(mut s) => s[stream.min(1)].push(chunk),
            Err(_) => vec![MASK.to_string()],
        }
    }

    /// The stream ended: what was held back.
    pub fn finish(&self, stream: usize) -> Vec<String> {
        match self.0.lock() {
            Ok(mut s) => s[stream.min(1)].finish(),
            Err(_) => Vec::new(),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Sealing: secret values replaced by placeholders the instance fills in itself

/// Where the instance reads a secret with its own role: what a placeholder stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretSource {
    pub id: String,
    pub key: Option<String>,
    pub stage: Option<String>,
}

/// A bake's secret values and, for each, a placeholder and where the instance reads it. The SSM
/// communicator seals everything it sends (secret values become placeholders) and checks that
/// nothing it sends holds any form of a secret; the instance fetches the values itself.
pub struct Sealer {
    /// (value, placeholder, source), longest value first.
    entries: Vec<(String, String, SecretSource)>,
    finder: Option<AhoCorasick>,
    placeholders: Option<AhoCorasick>,
    guard: Redactor,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("secrets", &self.entries.len())
            .finish()
    }
}

impl Sealer {
    /// From a bake's resolved references (reference text -> value); `nonce` makes the
    /// placeholders unique to the bake (letters and digits).
    pub fn new(resolved: &BTreeMap<String, String>, nonce: &str) -> Self {
        let mut found: Vec<(String, SecretSource)> = Vec::new();
        for (text, value) in resolved {
            let Ok(Reference::Secret { id, key, stage }) = parse_reference(text) else {
                continue;
            };
            if key.is_none() {
                // The whole secret: each value of a JSON secret is a secret of its own.
                if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(value) {
                    for (k, v) in map {
                        let v = match v {
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        };
                        found.push((
                            v,
                            SecretSource {
                                id: id.clone(),
                                key: Some(k),
                                stage: stage.clone(),
                            },
                        ));
                    }
                }
            }
            found.push((value.clone(), SecretSource { id, key, stage }));
        }
        found.retain(|(v, _)| v.len() >= MIN_SECRET_LEN);
        found.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        found.dedup_by(|a, b| a.0 == b.0);
        let mut guard = Redactor::default();
        let entries: Vec<_> = found
            .into_iter()
            .enumerate()
            .map(|(i, (value, source))| {
                guard.add(&value);
                (value, format!("BAKERY_SECRET_{nonce}_{i}_"), source)
            })
            .collect();
        let build = |p: Vec<&str>| {
            (!p.is_empty())
                .then(|| {
                    AhoCorasick::builder()
                        .match_kind(MatchKind::LeftmostLongest)
                        .build(p)
                        .ok()
                })
                .flatten()
        };
        Self {
            finder: build(entries.iter().map(|e| e.0.as_str()).collect()),
            placeholders: build(entries.iter().map(|e| e.1.as_str()).collect()),
            entries,
            guard,
        }
    }

    /// True when the bake has no secret to seal.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `data` with every secret value replaced by its placeholder.
    pub fn seal(&self, data: &[u8]) -> Vec<u8> {
        match &self.finder {
            Some(f) => {
                let with: Vec<&str> = self.entries.iter().map(|e| e.1.as_str()).collect();
                f.replace_all_bytes(data, &with)
            }
            None => data.to_vec(),
        }
    }

    /// Every placeholder and where the instance reads its value.
    pub fn sources(&self) -> BTreeMap<String, SecretSource> {
        self.entries
            .iter()
            .map(|(_, p, s)| (p.clone(), s.clone()))
            .collect()
    }

    /// The placeholders `data` holds.
    pub fn used(&self, data: &[u8]) -> BTreeMap<String, SecretSource> {
        let Some(p) = &self.placeholders else {
            return BTreeMap::new();
        };
        p.find_iter(data)
            .map(|m| {
                let (_, ph, s) = &self.entries[m.pattern().as_usize()];
                (ph.clone(), s.clone())
            })
            .collect()
    }

    /// True if `text` holds any form of a secret outside its placeholders: it must not be sent.
    pub fn leaks(&self, text: &[u8]) -> bool {
        let cleaned = match &self.placeholders {
            Some(p) => {
                let blanks = vec!["\0"; self.entries.len()];
                p.replace_all_bytes(text, &blanks)
            }
            None => text.to_vec(),
        };
        self.guard.finds_in(&cleaned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "s3cr3t-Pa55w0rd!";

    fn redactor_of(secrets: &[&str]) -> Redactor {
        let mut r = Redactor::default();
        for s in secrets {
            r.add(s);
        }
        r
    }

    fn redactor() -> Redactor {
        redactor_of(&[PW])
    }

    /// The lines shown for `output`, given to the redactor in pieces of `piece` bytes.
    fn shown_with(r: Redactor, output: &[u8], piece: usize) -> Vec<String> {
        let mut l = LineRedactor::new(r);
        let mut out: Vec<String> = output
            .chunks(piece.max(1))
            .flat_map(|c| l.push(c))
            .collect();
        out.extend(l.finish());
        out
    }

    fn shown(output: &str) -> Vec<String> {
        let whole = shown_with(redactor(), output.as_bytes(), output.len());
        for piece in [1, 3, 7] {
            assert_eq!(
                shown_with(redactor(), output.as_bytes(), piece),
                whole,
                "pieces of {piece}"
            );
        }
        whole
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn plain_url_encoded_and_base64_forms_are_masked() {
        let r = redactor();
        assert_eq!(
            r.redact(&format!("password={PW}")),
            format!("password={MASK}")
        );
        assert_eq!(r.redact("u=s3cr3t-Pa55w0rd%21"), format!("u={MASK}"));
        for prefix in ["", "x", "xy", "user:"] {
            let encoded = b64(format!("{prefix}{PW}tail").as_bytes());
            let shown = r.redact(&encoded);
            assert!(shown.contains(MASK), "{prefix:?}: {encoded} -> {shown}");
            assert!(!shown.contains(&b64(PW.as_bytes())[2..20]));
        }
        assert_eq!(
            format!("{:?} {}", Secret::new(PW), Secret::new(PW)),
            format!("{MASK} {MASK}")
        );
        assert!(!format!("{r:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_secret_split_across_lines_is_masked_in_every_line() {
        let out = shown("before\ns3cr3t-P\na55w0\nrd!\nafter\n");
        assert_eq!(out, vec!["before", MASK, MASK, MASK, "after"]);
    }

    #[test]
    fn clean_output_passes_unchanged_and_in_order() {
        let lines: Vec<String> = (0..50)
            .map(|i| format!("line {i} of a long enough output"))
            .collect();
        assert_eq!(shown(&(lines.join("\n") + "\n")), lines);
        // No trailing newline: the last line still comes out; CRLF loses its CR.
        assert_eq!(shown("a\r\nb"), vec!["a", "b"]);
    }

    #[test]
    fn short_values_are_not_masked_everywhere() {
        let r = redactor_of(&["ab"]);
        assert_eq!(r.redact("abc"), "abc");
        assert!(r.is_empty());
    }

    /// Issue #10, item 4: a needle with `\n` never matched held lines joined without one.
    #[test]
    fn a_multi_line_secret_is_masked_in_every_line() {
        let pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n-----END KEY-----\n";
        let r = redactor_of(&[pem]);
        let printed = format!("key:\n{pem}done\n");
        let out = shown_with(r.clone(), printed.as_bytes(), 5);
        assert_eq!(out, vec!["key:", MASK, MASK, MASK, MASK, "done"]);
        // Inside one line as JSON (`\n` escapes), and in base64 wrapped at 76 columns.
        assert_eq!(
            r.redact(&format!(
                "{{\"key\":{}}}",
                serde_json::to_string(pem).unwrap()
            )),
            format!("{{\"key\":\"{MASK}\"}}")
        );
        let wrapped: Vec<String> = b64(pem.as_bytes())
            .as_bytes()
            .chunks(76)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let out = shown_with(r.clone(), (wrapped.join("\n") + "\n").as_bytes(), 64);
        for line in &out {
            assert!(line.starts_with(MASK) || line.len() <= 4, "{out:?}");
        }
        // A PEM key through `$(cat key)` loses its last newline.
        let out = r.redact(&b64(pem.trim_end().as_bytes()));
        assert!(out.len() <= MASK.len() + 4, "{out}");
    }

    /// Issue #10, item 5: only `quote(s, safe="")` with uppercase hex was caught.
    #[test]
    fn every_url_encoding_of_a_secret_is_masked() {
        let secret = "p@ss w/rd+Ünï!ç\"\\x";
        let r = redactor_of(&[secret]);
        for (how, encoded) in [
            (
                "quote(safe='')",
                "p%40ss%20w%2Frd%2B%C3%9Cn%C3%AF%21%C3%A7%22%5Cx",
            ),
            ("quote()", "p%40ss%20w/rd%2B%C3%9Cn%C3%AF%21%C3%A7%22%5Cx"),
            (
                "quote_plus()",
                "p%40ss+w%2Frd%2B%C3%9Cn%C3%AF%21%C3%A7%22%5Cx",
            ),
            (
                "lowercase",
                "p%40ss%20w%2frd%2b%c3%9cn%c3%af%21%c3%a7%22%5cx",
            ),
            (
                "quote_plus(safe='/')",
                "p%40ss+w/rd%2B%C3%9Cn%C3%AF%21%C3%A7%22%5Cx",
            ),
            ("hex", "7040737320772f72642bc39c6ec3af21c3a7225c78"),
            ("HEX", "7040737320772F72642BC39C6EC3AF21C3A7225C78"),
            ("plain", secret),
        ] {
            let line = format!("url=https://db/?pw={encoded}&x=1");
            assert_eq!(
                r.redact(&line),
                format!("url=https://db/?pw={MASK}&x=1"),
                "{how}"
            );
            assert_eq!(
                shown_with(r.clone(), line.as_bytes(), 2),
                vec![format!("url=https://db/?pw={MASK}&x=1")],
                "{how}, streamed"
            );
        }
    }

    /// Issue #10, item 13: blank lines were held back (and rescanned) until the stream ended.
    #[test]
    fn blank_lines_are_passed_on_at_once() {
        let mut l = LineRedactor::new(redactor());
        assert_eq!(l.push("\n\n"), vec!["", ""]);
        assert_eq!(l.push("\n"), vec![""]);
        // Behind a line that may still be part of a secret, they wait for it.
        assert!(l.push("s3cr3t\n\n\n").is_empty());
        assert_eq!(
            l.push("-Pa55w0rd!\n"),
            Vec::<String>::new(),
            "held until the match is certain"
        );
        let mut rest = l.push("x".repeat(200) + "\n");
        rest.extend(l.finish());
        assert_eq!(rest[..4], [MASK, "", "", MASK]);
    }

    #[test]
    fn a_long_line_is_cut_with_a_note_and_a_secret_across_the_cut_is_masked() {
        let mut long = "A".repeat(MAX_LINE_BYTES - 5);
        long.push_str(PW);
        long.push_str(&"B".repeat(3 * MAX_LINE_BYTES));
        let out = shown_with(redactor(), format!("{long}\nnext\n").as_bytes(), 4096);
        assert_eq!(
            out.len(),
            2,
            "{:?}",
            out.iter().map(String::len).collect::<Vec<_>>()
        );
        let expected = format!(
            "{}{MASK} [bakery: line cut: {MAX_LINE_BYTES} of its {} bytes shown]",
            "A".repeat(MAX_LINE_BYTES - 5),
            long.len()
        );
        assert_eq!(out[0], expected);
        assert_eq!(out[1], "next");
    }

    /// A big secret (a 3 KiB key) takes the compact automaton: the same masks.
    #[test]
    fn a_big_secret_is_masked_by_the_compact_automaton_too() {
        let body: String = (0..3000u32)
            .map(|i| {
                char::from(
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                        [(i * 7 % 62) as usize],
                )
            })
            .collect::<Vec<_>>()
            .chunks(64)
            .map(|c| c.iter().collect::<String>())
            .collect::<Vec<_>>()
            .join("\n");
        let key = format!("-----BEGIN KEY-----\n{body}\n-----END KEY-----\n");
        let r = redactor_of(&[&key, PW]);
        assert!(matches!(
            r.matcher.as_deref().map(|m| &m.raw),
            Some(Machine::Nfa(_))
        ));
        let out = shown_with(r.clone(), format!("k:\n{key}pw {PW}\n").as_bytes(), 1000);
        assert_eq!(out.first().map(String::as_str), Some("k:"));
        assert!(out[1..out.len() - 1].iter().all(|l| l == MASK), "{out:?}");
        assert_eq!(out.last().unwrap(), &format!("pw {MASK}"));
        // The last base64 characters also depend on what follows: they may stay.
        let encoded = r.redact(&b64(key.as_bytes()));
        assert!(
            encoded.starts_with(MASK) && encoded.len() <= MASK.len() + 4,
            "{encoded}"
        );
    }

    #[test]
    fn overlapping_and_repeated_secrets_are_masked_whole() {
        let r = redactor_of(&["abcdabcd", "cdab"]);
        assert_eq!(r.redact("xabcdabcdabcdy"), format!("x{MASK}y"));
        assert_eq!(r.redact("cdab cdab"), format!("{MASK} {MASK}"));
    }

    #[test]
    fn a_poisoned_lock_hides_output_instead_of_showing_it() {
        let shared = SharedRedactor::default();
        shared.set(redactor());
        let output = Arc::new(OutputRedactor::new(shared.get()));
        let (s, o) = (shared.clone(), output.clone());
        let _ = std::thread::spawn(move || {
            let _g = s.0.write().unwrap();
            let _h = o.0.lock().unwrap();
            panic!("poison both");
        })
        .join();
        let mut l = LineRedactor::new(shared.get());
        let mut out = l.push("nothing secret here\n\n");
        out.extend(l.finish());
        assert_eq!(out, vec![MASK, ""]);
        assert_eq!(output.push(0, b"s3cr3t-Pa55w0rd!\n"), vec![MASK]);
        assert_eq!(redactor_of(&[]).redact("x"), "x");
        assert_eq!(shared.get().redact("plain text"), MASK);
    }

    #[test]
    fn sealing_replaces_every_secret_value_and_the_guard_sees_what_is_left() {
        let resolved = BTreeMap::from([
            (
                "secret:app/db".to_string(),
                r#"{"user":"app","password":"hunter2-long","port":5432}"#.to_string(),
            ),
            (
                "secret:app/api#token@AWSPREVIOUS".to_string(),
                "tok-123456".to_string(),
            ),
            ("rds:db.address".to_string(), "db.internal".to_string()),
        ]);
        let s = Sealer::new(&resolved, "n0nce");
        let sealed = s.seal(b"P=hunter2-long T=tok-123456 H=db.internal port=5432");
        let text = String::from_utf8(sealed.clone()).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("tok-1"),
            "{text}"
        );
        assert!(
            text.contains("H=db.internal"),
            "RDS values are not secrets: {text}"
        );
        assert!(!s.leaks(&sealed));
        let used = s.used(&sealed);
        let sources: Vec<_> = used.values().collect();
        assert!(sources.contains(&&SecretSource {
            id: "app/db".into(),
            key: Some("password".into()),
            stage: None
        }));
        assert!(sources.contains(&&SecretSource {
            id: "app/api".into(),
            key: Some("token".into()),
            stage: Some("AWSPREVIOUS".into())
        }));
        // "app" is too short to be a secret on its own.
        assert_eq!(used.len(), 3, "{used:?}");
        assert!(s.leaks(b64(b"x hunter2-long y").as_bytes()));
        assert!(s.leaks(b"pw=hunter2%2Dlong"));
        assert!(Sealer::new(&BTreeMap::new(), "n").is_empty());
    }

    /// Big output comes through whole: one line cut, every blank line (the timing is measured by
    /// `scripts/bench-redact`, not here).
    #[test]
    fn big_output_is_handled_in_one_pass() {
        let line = vec![b'A'; 2 << 20];
        let out = shown_with(redactor(), &line, 64 * 1024);
        assert_eq!(out.len(), 1);
        assert!(out[0].len() < MAX_LINE_BYTES + 100);
        let blanks = vec![b'\n'; 20_000];
        assert_eq!(shown_with(redactor(), &blanks, 4096).len(), 20_000);
    }
}
