//! The text side of response guards: the guards of a plan made ready for one response
//! ([`Checks`]), prompt reflection as a local detector ([`Reflection`]), and the incremental
//! scanner of one text stream with its hold-back rule ([`TextScan`]).
//!
//! # The hold-back rule
//!
//! Let `L` be the longest match and `C` the widest context of the guards that act on the text
//! (block or redact; audit guards never hold anything back), and `end` the length of the text
//! assembled so far. By the [locality contract](crate::guard::Detector), a match `[s, e)`
//! found in a window of the text is a match of the whole text once the window holds `C` bytes
//! on either side of it (or reaches the text's start / end), and every match that covers a
//! byte `x` starts after `x - L` and ends before `x + L`. So every match covering a byte below
//! the frontier `F = end - L - C` is known, and the output is decided up to `F`:
//!
//! - text before `F` that no match covers is released as it is;
//! - a group of overlapping matches (merged as [`redact_hits`](crate::guard::redact_hits)
//!   merges them) is masked with the mask of its first match as soon as that match starts
//!   below `F` (nothing can start before it any more); the rest of the group is swallowed as
//!   it arrives, and the group closes once its end is below `F` (no match starting inside it
//!   can be unknown then). So a long chain of overlapping matches costs no memory;
//! - a block match stops the stream as soon as it is certain (its right context is in), which
//!   is always before any byte of it is released.
//!
//! At the end of the text (`finish`), `F = end`.
//!
//! # Reading each byte a few times, not once per event
//!
//! The rule holds per guard: with `L`, `C` a guard's own, every match of it covering a byte
//! below `scanned - L - C` is known once it has read the text up to `scanned`, so the
//! frontier is the least of those over the acting guards. A guard is therefore not run on
//! every event: it reads again once `step` new bytes are in, over a window from
//! `L + 2C` before its previous scan point (its left context; see [`TextScan::scan`]). With
//! `H` the largest `L + C` of the acting guards:
//!
//! - an acting guard's step is `max(H - (L + C), H / 4)`: a guard narrower than the widest
//!   waits until it would hold the frontier back, and the widest reads every quarter of its
//!   hold. So the stream holds back at most `H + H / 4` bytes (plus the event that arrives);
//! - an audit guard never holds text back: it reads once `L + 2C` new bytes are in, so each
//!   byte about twice.
//!
//! The window of original text kept is what is not yet released and each guard's left
//! context, so memory is bounded by the guards, not by the length of the stream.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::guard::detect::Found;
use crate::guard::{Guard, Kind, Mode, ToolFirewall};

/// What one guard of a plan does on a response.
pub(super) enum Check {
    /// A detector of the guard ([`Guard::detector`]).
    Detect,
    /// Prompt reflection, ready for this request's system prompt (`None`: the prompt is
    /// shorter than the run looked for, nothing can match).
    Reflect(Option<Reflection>),
    /// A tool-call firewall.
    Firewall(Arc<ToolFirewall>),
    /// Nothing on responses (a guard that asks another service).
    Nothing,
}

/// One guard of a plan, ready for a response.
pub(super) struct Ready {
    pub(super) guard: Guard,
    pub(super) check: Check,
    /// The mode in force: a firewall or a reflection guard in redact mode blocks.
    pub(super) mode: Mode,
    /// Longest match, in bytes.
    pub(super) max_len: usize,
    /// Context either side, in bytes.
    pub(super) context: usize,
}

impl Ready {
    /// Whether this guard reads text (a detector, reflection).
    pub(super) fn reads_text(&self) -> bool {
        matches!(self.check, Check::Detect | Check::Reflect(Some(_)))
    }

    /// `L + C`: what this guard alone holds back of a stream it acts on.
    fn hold(&self) -> usize {
        self.max_len.saturating_add(self.context)
    }

    /// `L + 2C`: how far before its previous scan point a scan of this guard starts.
    fn reach(&self) -> usize {
        self.max_len.saturating_add(self.context.saturating_mul(2))
    }

    fn find(&self, text: &str, found: &mut Vec<Found>) {
        match &self.check {
            Check::Detect => {
                if let Some(detector) = self.guard.detector() {
                    detector.find(text, found);
                }
            }
            Check::Reflect(Some(reflection)) => reflection.find(text, found),
            _ => {}
        }
    }
}

/// The guards of a plan, ready for one response.
pub(super) struct Checks {
    pub(super) guards: Vec<Ready>,
    /// The largest `L + C` of the guards that act on text (block or redact): `H`.
    hold: usize,
    /// Some text guard blocks or redacts (text is held back).
    pub(super) acting: bool,
    /// Some guard reads text at all.
    pub(super) reads_text: bool,
}

impl Checks {
    pub(super) fn new(guards: &[Guard], system_prompt: &str) -> Checks {
        let guards: Vec<Ready> = guards
            .iter()
            .map(|guard| {
                let (check, max_len, context) = match guard.kind() {
                    Kind::Detect(d) => (Check::Detect, d.max_match_len(), d.context()),
                    Kind::Reflection(min) => {
                        let r = Reflection::new(system_prompt, *min);
                        let len = r.as_ref().map_or(0, |r| r.max_len);
                        (Check::Reflect(r), len, 0)
                    }
                    Kind::Firewall(f) => (Check::Firewall(f.clone()), 0, 0),
                    Kind::External(_) => (Check::Nothing, 0, 0),
                };
                let mode = match (&check, guard.get_mode()) {
                    (Check::Detect, mode) => mode,
                    (_, Mode::Audit) => Mode::Audit,
                    _ => Mode::Block,
                };
                Ready {
                    guard: guard.clone(),
                    check,
                    mode,
                    max_len,
                    context,
                }
            })
            .collect();
        let text = guards.iter().filter(|g| g.reads_text());
        let acting = text.clone().filter(|g| g.mode != Mode::Audit);
        Checks {
            hold: acting.clone().map(Ready::hold).max().unwrap_or(0),
            acting: acting.count() > 0,
            reads_text: text.count() > 0,
            guards,
        }
    }

    /// Whether some guard blocks or redacts (anything, text or tool calls).
    pub(super) fn any_acting(&self) -> bool {
        self.guards
            .iter()
            .any(|g| g.mode != Mode::Audit && !matches!(g.check, Check::Nothing))
    }

    /// `H`, the largest `L + C` of the guards that act on text.
    #[cfg(test)]
    pub(super) fn hold(&self) -> usize {
        self.hold
    }

    /// How much new text guard `g` waits for before it is scanned again (see the module
    /// docs).
    fn step(&self, g: &Ready) -> usize {
        if g.mode == Mode::Audit {
            g.reach().max(1)
        } else {
            (self.hold - g.hold()).max(self.hold / 4).max(1)
        }
    }
}

/// What a scan found that the caller must act on.
#[derive(Debug, Default)]
pub(super) struct Findings {
    /// Guards (by index) whose audit matches were found, with a label.
    pub(super) audit: Vec<(usize, Cow<'static, str>)>,
    /// The first block match found: its guard and label.
    pub(super) block: Option<(usize, Cow<'static, str>)>,
    /// Some redact match was applied.
    pub(super) redacted: Vec<usize>,
}

/// One hit of a redact guard, in absolute offsets of the stream.
#[derive(Debug)]
struct AbsHit {
    start: usize,
    end: usize,
    label: Cow<'static, str>,
    guard: usize,
}

/// The incremental scanner of one text stream (a choice's content, a tool call's arguments,
/// one Responses output text); see the module docs for the rule.
#[derive(Debug, Default)]
pub(super) struct TextScan {
    /// Original text from the absolute offset `start` on.
    window: String,
    start: usize,
    /// The output is decided up to here (absolute).
    pos: usize,
    /// A merged group of matches is being masked: its mask is out, its text is swallowed up
    /// to here (absolute, may be past the text assembled yet).
    group_end: Option<usize>,
    /// Per guard of the plan: the text's length at its previous scan (empty before the first
    /// advance).
    scanned: Vec<usize>,
    /// Certain redact hits not yet decided, ordered as [`redact_hits`](crate::guard::redact_hits)
    /// orders them.
    hits: Vec<AbsHit>,
    /// Scratch for detectors.
    found: Vec<Found>,
}

impl TextScan {
    /// The text assembled so far, in bytes.
    pub(super) fn end(&self) -> usize {
        self.start + self.window.len()
    }

    /// Bytes of original text held (released or not).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.window.len()
    }

    /// Bytes not yet decided.
    #[cfg(test)]
    pub(super) fn pending(&self) -> usize {
        self.end() - self.pos
    }

    /// Appends text of the stream.
    pub(super) fn push(&mut self, text: &str) {
        self.window.push_str(text);
    }

    /// Scans what was pushed: reports audit and block matches in `findings`, and appends the
    /// output decided (released text and masks) to `out`. With `finish`, the text is complete
    /// and everything is decided. `flagged` lists the audit guards already flagged (skipped).
    pub(super) fn advance(
        &mut self,
        checks: &Checks,
        flagged: &[bool],
        finish: bool,
        out: &mut String,
        findings: &mut Findings,
    ) {
        let end = self.end();
        self.scanned.resize(checks.guards.len(), 0);
        self.scan(checks, flagged, finish, findings);
        if findings.block.is_some() {
            return;
        }
        if !checks.acting {
            // Nothing is held back: the text goes as it came.
            out.push_str(self.text(self.pos, end));
            self.pos = end;
            self.group_end = None;
        } else {
            self.release(checks, finish, out, findings);
        }
        // Keeps what is not decided, and the left context of each guard's next scan.
        let mut from = self.pos.min(end);
        for (g, ready) in checks.guards.iter().enumerate() {
            if Self::skips(ready, g, flagged) {
                continue;
            }
            from = from.min(self.scanned[g].saturating_sub(ready.reach()));
        }
        if from > self.start {
            let mut cut = from - self.start;
            while !self.window.is_char_boundary(cut) {
                cut -= 1;
            }
            self.window.drain(..cut);
            self.start += cut;
        }
    }

    /// Whether guard `g` reads no text of this stream (it reads none, or it only audits and
    /// has flagged the response already).
    fn skips(ready: &Ready, g: usize, flagged: &[bool]) -> bool {
        !ready.reads_text()
            || (ready.mode == Mode::Audit && flagged.get(g).copied().unwrap_or(false))
    }

    /// Runs each text guard whose turn it is ([`Checks::step`]) over the part of the window
    /// where a match can have become certain since its previous scan, so a stream costs a
    /// detector about `(L + 2C + step) / step` times its text, not the whole window per event.
    ///
    /// A match `[s, e)` of a guard becomes certain at the first scan of it whose text reaches
    /// `e + C` (or the end of the text). Its previous scan reached `prev < e + C`, so
    /// `s > e - L > prev - L - C`: a window from `prev - L - 2C` holds its left context. Each
    /// match is therefore taken once, at that scan: redact hits are kept until they are
    /// decided, audit and block ones are acted on at once.
    fn scan(&mut self, checks: &Checks, flagged: &[bool], finish: bool, findings: &mut Findings) {
        let end = self.end();
        let mut added = false;
        for (index, ready) in checks.guards.iter().enumerate() {
            let prev = self.scanned[index];
            if Self::skips(ready, index, flagged)
                || !(finish || end.saturating_sub(prev) >= checks.step(ready))
            {
                continue;
            }
            self.scanned[index] = end;
            let mut from = prev
                .saturating_sub(ready.reach())
                .saturating_sub(self.start);
            while !self.window.is_char_boundary(from) {
                from -= 1;
            }
            let slice = &self.window[from..];
            self.found.clear();
            ready.find(slice, &mut self.found);
            for found in self.found.drain(..) {
                let r = found.range;
                // A detector's range that is not a range of the text is ignored, never a
                // panic.
                if r.start >= r.end
                    || r.end > slice.len()
                    || !slice.is_char_boundary(r.start)
                    || !slice.is_char_boundary(r.end)
                {
                    continue;
                }
                let (s, e) = (self.start + from + r.start, self.start + from + r.end);
                // Certain: its context either side is in the window (or the text ends
                // there).
                let left = self.start + from == 0 || r.start >= ready.context;
                let right = finish || e.saturating_add(ready.context) <= end;
                // Not certain at the previous scan already (then it was taken then).
                let new = e.saturating_add(ready.context) > prev;
                if !(left && right && new) {
                    continue;
                }
                match ready.mode {
                    Mode::Audit => {
                        findings.audit.push((index, found.label));
                        break;
                    }
                    Mode::Block => {
                        findings.block = Some((index, found.label));
                        return;
                    }
                    Mode::Redact => {
                        if e > self.pos {
                            self.hits.push(AbsHit {
                                start: s,
                                end: e,
                                label: found.label,
                                guard: index,
                            });
                            added = true;
                        }
                    }
                }
            }
        }
        if added {
            // As `redact_hits` orders them: by start, the longest first, then in guard order
            // (hits of one guard and range come from one scan, in the detector's order: the
            // sort is stable).
            self.hits.sort_by(|a, b| {
                a.start
                    .cmp(&b.start)
                    .then(b.end.cmp(&a.end))
                    .then(a.guard.cmp(&b.guard))
            });
        }
    }

    fn release(
        &mut self,
        checks: &Checks,
        finish: bool,
        out: &mut String,
        findings: &mut Findings,
    ) {
        let mut hits = std::mem::take(&mut self.hits);
        let end = self.end();
        // Every match of an acting guard `g` that covers a byte below `scanned_g - (L + C)`
        // is known.
        let mut frontier = if finish {
            end
        } else {
            checks
                .guards
                .iter()
                .zip(&self.scanned)
                .filter(|(g, _)| g.reads_text() && g.mode != Mode::Audit)
                .map(|(g, &scanned)| scanned.saturating_sub(g.hold()))
                .min()
                .unwrap_or(end)
        };
        while frontier > self.start && !self.window.is_char_boundary(frontier - self.start) {
            frontier -= 1;
        }
        let mut i = 0;
        loop {
            if let Some(mut group_end) = self.group_end {
                while i < hits.len() && hits[i].start < group_end && hits[i].start < frontier {
                    group_end = group_end.max(hits[i].end);
                    i += 1;
                }
                if group_end <= frontier {
                    self.pos = self.pos.max(group_end);
                    self.group_end = None;
                    continue;
                }
                self.pos = self.pos.max(group_end.min(end));
                self.group_end = Some(group_end);
                break;
            }
            // Hits wholly decided already are behind us.
            while i < hits.len() && hits[i].end <= self.pos {
                i += 1;
            }
            match hits.get(i).filter(|h| h.start < frontier) {
                Some(hit) => {
                    let start = hit.start.max(self.pos);
                    out.push_str(self.text(self.pos, start));
                    let guard = &checks.guards[hit.guard];
                    out.push_str(&guard.guard.mask_for(&hit.label));
                    if !findings.redacted.contains(&hit.guard) {
                        findings.redacted.push(hit.guard);
                    }
                    self.pos = start;
                    self.group_end = Some(hit.end);
                    i += 1;
                }
                None => {
                    if frontier > self.pos {
                        out.push_str(self.text(self.pos, frontier));
                        self.pos = frontier;
                    }
                    break;
                }
            }
        }
        // What is not decided waits for the next scan.
        hits.drain(..i);
        self.hits = hits;
    }

    /// The original text between two absolute offsets (empty if not held).
    fn text(&self, from: usize, to: usize) -> &str {
        let (a, b) = (
            from.saturating_sub(self.start),
            to.saturating_sub(self.start),
        );
        self.window.get(a..b).unwrap_or_default()
    }
}

/// Scans one whole text (a field of a JSON body, the full text of a `.done` event): its
/// output (`None` when unchanged) and findings.
pub(super) fn scan_whole(
    checks: &Checks,
    flagged: &[bool],
    text: &str,
    findings: &mut Findings,
) -> Option<String> {
    let mut scan = TextScan::default();
    scan.push(text);
    let mut out = String::new();
    scan.advance(checks, flagged, true, &mut out, findings);
    (checks.acting && findings.block.is_none() && out != text).then_some(out)
}

/// Prompt reflection as a local detector: every run of `min_chars` characters of the text that
/// is also a run of the system prompt. Rolling hashes of the prompt's windows in a table, the
/// text's windows looked up in it, each hit verified by comparing the text: linear in both.
pub(super) struct Reflection {
    prompt: Arc<str>,
    min_chars: usize,
    /// Hash of a window of the prompt → where the first such window starts.
    table: HashMap<u64, usize>,
    /// The longest window of the prompt, in bytes.
    max_len: usize,
    /// `BASE^(min_chars - 1)`.
    top: u64,
}

const BASE: u64 = 0x0100_0000_01b3;

impl Reflection {
    /// `None` when the prompt has fewer than `min_chars` characters.
    pub(super) fn new(prompt: &str, min_chars: usize) -> Option<Reflection> {
        let min_chars = min_chars.max(1);
        let top = (1..min_chars).fold(1u64, |acc, _| acc.wrapping_mul(BASE));
        let mut table = HashMap::new();
        let mut max_len = 0;
        windows(prompt, min_chars, top, |start, end, hash| {
            table.entry(hash).or_insert(start);
            max_len = max_len.max(end - start);
        });
        (!table.is_empty()).then(|| Reflection {
            prompt: Arc::from(prompt),
            min_chars,
            table,
            max_len,
            top,
        })
    }

    pub(super) fn find(&self, text: &str, found: &mut Vec<Found>) {
        windows(text, self.min_chars, self.top, |start, end, hash| {
            if let Some(&at) = self.table.get(&hash) {
                let window = &text[start..end];
                if self.prompt.get(at..at + window.len()) == Some(window) {
                    found.push(Found::new(start..end, "system_prompt"));
                }
            }
        });
    }
}

/// Calls `each(start, end, hash)` for every window of `k` characters of `text`.
fn windows(text: &str, k: usize, top: u64, mut each: impl FnMut(usize, usize, u64)) {
    // The byte offsets of the window's characters, as a ring.
    let mut ring: Vec<(usize, u32)> = Vec::with_capacity(k.min(4096));
    let mut head = 0;
    let mut hash = 0u64;
    for (i, c) in text.char_indices() {
        let c = c as u32;
        if ring.len() < k {
            ring.push((i, c));
            hash = hash.wrapping_mul(BASE).wrapping_add(u64::from(c));
        } else {
            let (_, old) = ring[head];
            hash = hash
                .wrapping_sub(u64::from(old).wrapping_mul(top))
                .wrapping_mul(BASE)
                .wrapping_add(u64::from(c));
            ring[head] = (i, c);
            head = (head + 1) % k;
        }
        if ring.len() == k {
            let start = ring[head % k].0;
            let end = i + char::from_u32(c).map_or(1, char::len_utf8);
            each(start, end, hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::detect::WordList;
    use crate::guard::Detector;

    /// Every occurrence of each word (overlapping ones too).
    struct Words(Vec<&'static str>);

    impl Detector for Words {
        fn find(&self, text: &str, found: &mut Vec<Found>) {
            for w in &self.0 {
                let mut from = 0;
                while let Some(at) = text.get(from..).and_then(|t| t.find(w)) {
                    found.push(Found::new(from + at..from + at + w.len(), "word"));
                    from += at + text[from + at..].chars().next().map_or(1, char::len_utf8);
                }
            }
        }
        fn max_match_len(&self) -> usize {
            self.0.iter().map(|w| w.len()).max().unwrap_or(0)
        }
        fn context(&self) -> usize {
            0
        }
    }

    fn redact(words: Vec<&'static str>) -> Checks {
        Checks::new(
            &[Guard::new("w", Words(words)).mode(Mode::Redact).mask("#")],
            "",
        )
    }

    fn stream(checks: &Checks, pieces: &[&str]) -> (String, Vec<usize>) {
        let mut scan = TextScan::default();
        let mut out = String::new();
        let mut pending = Vec::new();
        for p in pieces {
            scan.push(p);
            let mut f = Findings::default();
            scan.advance(checks, &[false], false, &mut out, &mut f);
            pending.push(scan.pending());
        }
        let mut f = Findings::default();
        scan.advance(checks, &[false], true, &mut out, &mut f);
        (out, pending)
    }

    #[test]
    fn a_split_match_is_masked_once() {
        let checks = redact(vec!["secret"]);
        for cut in 0..=12 {
            let text = "my secret!!!";
            let (out, _) = stream(&checks, &[&text[..cut], &text[cut..]]);
            assert_eq!(out, "my #!!!", "cut at {cut}");
        }
    }

    #[test]
    fn the_hold_back_is_at_most_l_plus_c() {
        let checks = redact(vec!["secret"]);
        assert_eq!(checks.hold(), 6);
        let pieces: Vec<&str> = vec!["a"; 100];
        let (out, pending) = stream(&checks, &pieces);
        assert_eq!(out, "a".repeat(100));
        assert!(pending.iter().all(|&p| p <= 6), "{pending:?}");
        // Text that can no longer start a match goes at once, only the tail is held.
        assert_eq!(pending[50], 6);
    }

    #[test]
    fn a_chain_of_overlapping_matches_is_one_mask_and_bounded() {
        let checks = redact(vec!["abab"]);
        let mut pieces = vec!["x"];
        pieces.extend(std::iter::repeat_n("ab", 1000));
        pieces.push("y");
        let mut scan = TextScan::default();
        let mut out = String::new();
        for p in &pieces {
            scan.push(p);
            scan.advance(&checks, &[false], false, &mut out, &mut Findings::default());
            assert!(scan.held() <= 32, "held {}", scan.held());
        }
        scan.advance(&checks, &[false], true, &mut out, &mut Findings::default());
        assert_eq!(out, "x#y");
        let whole = format!("x{}y", "ab".repeat(1000));
        assert_eq!(checks.guards[0].guard.redact(&whole), "x#y");
    }

    #[test]
    fn adjacent_matches_get_a_mask_each() {
        let checks = redact(vec!["ab"]);
        let (out, _) = stream(&checks, &["a", "ba", "b", "ab"]);
        assert_eq!(out, "###");
    }

    #[test]
    fn block_is_found_before_any_byte_of_the_match_is_released() {
        let checks = Checks::new(
            &[Guard::new("w", Words(vec!["secret"])).mode(Mode::Block)],
            "",
        );
        let mut scan = TextScan::default();
        let mut out = String::new();
        for p in ["hello ", "se", "cr", "et", " more"] {
            scan.push(p);
            let mut f = Findings::default();
            scan.advance(&checks, &[false], false, &mut out, &mut f);
            if f.block.is_some() {
                assert!(!out.contains('s'), "{out}");
                return;
            }
        }
        panic!("not blocked");
    }

    /// Reports ranges that are not ranges of the text.
    struct Broken;

    impl Detector for Broken {
        fn find(&self, text: &str, found: &mut Vec<Found>) {
            found.push(Found::new(0..text.len() + 5, "out"));
            found.push(Found::new(std::ops::Range { start: 3, end: 1 }, "reversed"));
            found.push(Found::new(1..2, "inside a character"));
            found.push(Found::new(2..2, "empty"));
        }
        fn max_match_len(&self) -> usize {
            3
        }
    }

    #[test]
    fn a_detector_giving_bad_ranges_is_ignored_never_a_panic() {
        for mode in [Mode::Audit, Mode::Block, Mode::Redact] {
            let checks = Checks::new(&[Guard::new("b", Broken).mode(mode)], "");
            let (out, _) = stream(&checks, &["éé", "x", "", "ü"]);
            assert_eq!(out, "ééxü");
        }
    }

    #[test]
    fn reflection_finds_runs_of_the_prompt() {
        let r = Reflection::new("You are a helpful pirate. Never say arr.", 10).unwrap();
        let mut found = Vec::new();
        r.find("well: a helpful pirate!", &mut found);
        assert!(!found.is_empty());
        assert!(found
            .iter()
            .all(|f| "You are a helpful pirate."
                .contains(&"well: a helpful pirate!"[f.range.clone()])));
        found.clear();
        r.find("a helpful", &mut found);
        assert!(found.is_empty());
        assert!(Reflection::new("short", 10).is_none());
        // Multi-byte characters: windows are of characters.
        let r = Reflection::new("ééééé", 3).unwrap();
        found.clear();
        r.find("xééé", &mut found);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].range, 1..7);
    }

    /// Counts what a detector is given to read.
    struct Counted(WordList, Arc<std::sync::atomic::AtomicUsize>);

    impl Detector for Counted {
        fn find(&self, text: &str, found: &mut Vec<Found>) {
            self.1
                .fetch_add(text.len(), std::sync::atomic::Ordering::Relaxed);
            self.0.find(text, found)
        }
        fn max_match_len(&self) -> usize {
            self.0.max_match_len()
        }
        fn context(&self) -> usize {
            self.0.context()
        }
    }

    #[test]
    fn a_long_stream_is_read_a_few_times_over_not_once_per_event() {
        let piece = "The team met on Tuesday to review the rollback plan. Customers asked for it. ";
        for mode in [Mode::Audit, Mode::Block, Mode::Redact] {
            let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let words = WordList::profanity();
            let reach = words.max_match_len() + 2 * words.context();
            let checks = Checks::new(
                &[Guard::new("w", Counted(words, read.clone())).mode(mode)],
                "",
            );
            let mut scan = TextScan::default();
            let mut out = String::new();
            let mut most_pending = 0;
            for _ in 0..4000 {
                scan.push(piece);
                scan.advance(&checks, &[false], false, &mut out, &mut Findings::default());
                most_pending = most_pending.max(scan.pending());
                assert!(scan.held() <= 3 * reach, "{mode:?} holds {}", scan.held());
            }
            scan.advance(&checks, &[false], true, &mut out, &mut Findings::default());
            let text = piece.len() * 4000;
            assert_eq!(out.len(), text);
            let read = read.load(std::sync::atomic::Ordering::Relaxed);
            // Audit: each byte about twice (its scan and the next one's left context); an
            // acting guard: its window (L + 2C) once per quarter of its hold.
            let most = if mode == Mode::Audit {
                2 * text + reach
            } else {
                7 * text
            };
            assert!(
                read <= most,
                "{mode:?} read {read} bytes of a {text}-byte stream"
            );
            assert!(read >= text, "{mode:?} read {read} < {text}");
            // The hold-back: at most H and a quarter (nothing for audit).
            let h = checks.hold();
            if mode == Mode::Audit {
                assert_eq!(most_pending, 0);
            } else {
                assert!(
                    most_pending <= h + h / 4 + piece.len(),
                    "{most_pending} > 1.25 * {h}"
                );
                assert!(most_pending >= h, "{most_pending} < {h}");
            }
        }
    }

    /// Finds nothing, with a long reach.
    struct Wide;

    impl Detector for Wide {
        fn find(&self, _: &str, _: &mut Vec<Found>) {}
        fn max_match_len(&self) -> usize {
            8000
        }
    }

    #[test]
    fn a_narrow_guard_beside_a_wide_one_reads_its_text_about_once() {
        let piece = "The team met on Tuesday to review the rollback plan. Customers asked for it. ";
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let checks = Checks::new(
            &[
                Guard::new("narrow", Counted(WordList::profanity(), read.clone())),
                Guard::new("wide", Wide),
            ],
            "",
        );
        let mut scan = TextScan::default();
        let mut out = String::new();
        for _ in 0..4000 {
            scan.push(piece);
            scan.advance(
                &checks,
                &[false, false],
                false,
                &mut out,
                &mut Findings::default(),
            );
            // The wide guard sets the hold-back; the narrow one never adds to it.
            assert!(scan.pending() <= checks.hold() + checks.hold() / 4 + piece.len());
        }
        scan.advance(
            &checks,
            &[false, false],
            true,
            &mut out,
            &mut Findings::default(),
        );
        let text = piece.len() * 4000;
        assert_eq!(out.len(), text);
        // It waits until it would hold the frontier back (H - its own L + C), so each scan
        // reads its window once per that many new bytes.
        let read = read.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            read * 10 <= text * 14,
            "read {read} bytes of a {text}-byte stream"
        );
    }

    #[test]
    fn an_audit_guard_that_has_flagged_reads_no_more() {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let checks = Checks::new(
            &[Guard::new("w", Counted(WordList::profanity(), read.clone())).mode(Mode::Audit)],
            "",
        );
        let mut scan = TextScan::default();
        let mut out = String::new();
        for _ in 0..200 {
            scan.push("some text that goes on and on ");
            scan.advance(&checks, &[true], false, &mut out, &mut Findings::default());
        }
        scan.advance(&checks, &[true], true, &mut out, &mut Findings::default());
        assert_eq!(read.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(out.len(), 200 * 30);
        // Nor does it keep text for a scan that will not come.
        assert!(scan.held() <= 30, "{}", scan.held());
    }
}
