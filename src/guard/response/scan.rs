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
//! At the end of the text (`finish`), `F = end`. The window of original text kept is what is
//! not yet released plus `L + 2C` bytes before it (left context), so memory is bounded by the
//! guards, not by the length of the stream.

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
    /// `L + C` of the guards that act on text (block or redact): what a stream holds back.
    hold: usize,
    /// `L + 2C` over every text guard: the left context kept.
    keep: usize,
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
        let text: Vec<&Ready> = guards.iter().filter(|g| g.reads_text()).collect();
        let acting: Vec<&&Ready> = text.iter().filter(|g| g.mode != Mode::Audit).collect();
        let max = |it: &mut dyn Iterator<Item = usize>| it.max().unwrap_or(0);
        let (l, c) = (
            max(&mut acting.iter().map(|g| g.max_len)),
            max(&mut acting.iter().map(|g| g.context)),
        );
        let (la, ca) = (
            max(&mut text.iter().map(|g| g.max_len)),
            max(&mut text.iter().map(|g| g.context)),
        );
        Checks {
            hold: l.saturating_add(c),
            keep: la.saturating_add(ca.saturating_mul(2)),
            acting: !acting.is_empty(),
            reads_text: !text.is_empty(),
            guards,
        }
    }

    /// Whether some guard blocks or redacts (anything, text or tool calls).
    pub(super) fn any_acting(&self) -> bool {
        self.guards
            .iter()
            .any(|g| g.mode != Mode::Audit && !matches!(g.check, Check::Nothing))
    }

    /// How many bytes a stream holds back at most beyond what could start a match.
    #[cfg(test)]
    pub(super) fn hold(&self) -> usize {
        self.hold
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

/// One hit of an acting guard, in absolute offsets of the stream.
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
    /// The text's length at the previous scan.
    scanned: usize,
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
        let mut hits: Vec<AbsHit> = Vec::new();
        if end > self.scanned || finish {
            self.scan(checks, flagged, finish, &mut hits, findings);
        }
        if findings.block.is_some() {
            return;
        }
        if !checks.acting {
            // Nothing is held back: the text goes as it came.
            out.push_str(self.text(self.pos, end));
            self.pos = end;
            self.group_end = None;
        } else {
            self.release(checks, finish, &mut hits, out, findings);
        }
        self.scanned = end;
        // Keeps the left context of what is not decided yet, and of what the next scan sees
        // first.
        let from = self.pos.min(end).saturating_sub(checks.keep);
        if from > self.start {
            let mut cut = from - self.start;
            while !self.window.is_char_boundary(cut) {
                cut -= 1;
            }
            self.window.drain(..cut);
            self.start += cut;
        }
    }

    fn scan(
        &mut self,
        checks: &Checks,
        flagged: &[bool],
        finish: bool,
        hits: &mut Vec<AbsHit>,
        findings: &mut Findings,
    ) {
        let end = self.end();
        for (index, ready) in checks.guards.iter().enumerate() {
            if !ready.reads_text()
                || (ready.mode == Mode::Audit && flagged.get(index).copied().unwrap_or(false))
            {
                continue;
            }
            self.found.clear();
            ready.find(&self.window, &mut self.found);
            for found in self.found.drain(..) {
                let r = found.range;
                // A detector's range that is not a range of the text is ignored, never a
                // panic.
                if r.start >= r.end
                    || r.end > self.window.len()
                    || !self.window.is_char_boundary(r.start)
                    || !self.window.is_char_boundary(r.end)
                {
                    continue;
                }
                let (s, e) = (self.start + r.start, self.start + r.end);
                // Certain: its context either side is in the window (or the text ends).
                let left = self.start == 0 || r.start >= ready.context;
                let right = finish || e.saturating_add(ready.context) <= end;
                match ready.mode {
                    Mode::Audit => {
                        if left && right {
                            findings.audit.push((index, found.label));
                            break;
                        }
                    }
                    Mode::Block => {
                        if left && right && findings.block.is_none() {
                            findings.block = Some((index, found.label));
                            return;
                        }
                    }
                    Mode::Redact => {
                        if left && e > self.pos {
                            hits.push(AbsHit {
                                start: s,
                                end: e,
                                label: found.label,
                                guard: index,
                            });
                        }
                    }
                }
            }
        }
    }

    fn release(
        &mut self,
        checks: &Checks,
        finish: bool,
        hits: &mut [AbsHit],
        out: &mut String,
        findings: &mut Findings,
    ) {
        let end = self.end();
        let mut frontier = if finish {
            end
        } else {
            end.saturating_sub(checks.hold)
        };
        while frontier > self.start && !self.window.is_char_boundary(frontier - self.start) {
            frontier -= 1;
        }
        // As `redact_hits` orders them: by start, the longest first, then in guard order.
        hits.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
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
            found.push(Found::new(3..1, "reversed"));
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
}
