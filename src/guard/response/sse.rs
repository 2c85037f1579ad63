//! SSE framing for response guards: an event splitter over frames split anywhere, and the
//! reading and rewriting of one event's `data`.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use memchr::memchr2;

/// A piece of the stream, as the splitter cuts it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    /// One whole event, its closing blank line included.
    Event(Bytes),
    /// The `\n` of a `\r\n` whose `\r` ended the event before (passed on as it is).
    Stray(Bytes),
}

/// Cuts a byte stream into whole events (lines end with `\n`, `\r\n` or `\r`; an event ends
/// with a blank line). Holds only the current, incomplete event.
#[derive(Debug, Default)]
pub(super) struct Splitter {
    held: BytesMut,
    /// Bytes in the current line so far.
    line: usize,
    /// The last byte seen ended a line with `\r`.
    cr: bool,
    /// The last event ended with a `\r` at the end of the previous chunk.
    event_cr: bool,
}

impl Splitter {
    /// Bytes of the incomplete event held.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// Cuts `chunk`, appending the whole events (and strays) to `out`.
    pub(super) fn push(&mut self, chunk: &Bytes, out: &mut Vec<Piece>) {
        let len = chunk.len();
        let mut i = 0;
        let mut start = 0;
        if std::mem::take(&mut self.event_cr) && chunk.first() == Some(&b'\n') {
            out.push(Piece::Stray(chunk.slice(0..1)));
            self.cr = false;
            i = 1;
            start = 1;
        }
        while i < len {
            let Some(off) = memchr2(b'\r', b'\n', &chunk[i..]) else {
                self.cr = false;
                self.line += len - i;
                break;
            };
            if off > 0 {
                self.cr = false;
                self.line += off;
            }
            let j = i + off;
            let byte = chunk[j];
            i = j + 1;
            if byte == b'\n' && self.cr {
                // The `\n` of a `\r\n`.
                self.cr = false;
                continue;
            }
            self.cr = byte == b'\r';
            if self.line > 0 {
                self.line = 0;
                continue;
            }
            // A blank line: the event ends here (with the `\n` of a `\r\n` when it is there).
            if self.cr && i < len && chunk[i] == b'\n' {
                i += 1;
                self.cr = false;
            }
            let event = if self.held.is_empty() {
                chunk.slice(start..i)
            } else {
                self.held.extend_from_slice(&chunk[start..i]);
                self.held.split().freeze()
            };
            out.push(Piece::Event(event));
            start = i;
            if self.cr {
                // The `\r` ended the chunk: a `\n` may open the next one.
                self.cr = false;
                self.event_cr = i == len;
            }
        }
        if start < len {
            self.held.extend_from_slice(&chunk[start..]);
        }
    }

    /// The end of the stream: the last event if it lacks its blank line.
    pub(super) fn finish(&mut self) -> Option<Bytes> {
        self.line = 0;
        self.cr = false;
        (!self.held.is_empty()).then(|| self.held.split().freeze())
    }
}

/// One event, read: its `data` (its `data:` lines joined by `\n`) and where its lines are.
#[derive(Debug)]
pub(super) struct Event<'a> {
    raw: &'a [u8],
    /// The data, when the event has `data:` lines and they are UTF-8 (borrowed when there is
    /// one line).
    pub(super) data: Option<Cow<'a, str>>,
    /// The line ending the event uses (the first one in it).
    term: &'static [u8],
}

impl<'a> Event<'a> {
    pub(super) fn read(raw: &'a [u8]) -> Event<'a> {
        let mut data: Option<Cow<'a, [u8]>> = None;
        let mut term: Option<&'static [u8]> = None;
        for (line, t) in lines(raw) {
            if !t.is_empty() {
                term.get_or_insert(t);
            }
            if let Some(value) = field(line, b"data") {
                match &mut data {
                    Some(d) => {
                        let d = d.to_mut();
                        d.push(b'\n');
                        d.extend_from_slice(value);
                    }
                    None => data = Some(Cow::Borrowed(value)),
                }
            }
        }
        let data = data.and_then(|d| match d {
            Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
            Cow::Owned(v) => String::from_utf8(v).ok().map(Cow::Owned),
        });
        Event {
            raw,
            data,
            term: term.unwrap_or(b"\n"),
        }
    }

    /// The event with its data replaced by `data`: its other lines as they were, the data
    /// lines where the first one was (one `data:` line per line of `data`), then the blank
    /// line.
    pub(super) fn render(&self, data: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw.len() + data.len() / 8 + 16);
        let mut written = false;
        let write_data = |out: &mut Vec<u8>| {
            for line in data.split('\n') {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(line.as_bytes());
                out.extend_from_slice(self.term);
            }
        };
        for (line, t) in lines(self.raw) {
            if line.is_empty() {
                continue;
            }
            if field(line, b"data").is_some() {
                if !written {
                    write_data(&mut out);
                    written = true;
                }
                continue;
            }
            out.extend_from_slice(line);
            out.extend_from_slice(t);
        }
        if !written {
            write_data(&mut out);
        }
        out.extend_from_slice(self.term);
        out
    }

    /// The event's lines other than data lines and blank ones (`event:`, `id:`, comments).
    pub(super) fn other_lines(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (line, t) in lines(self.raw) {
            if !line.is_empty() && field(line, b"data").is_none() && !line.starts_with(b":") {
                out.extend_from_slice(line);
                out.extend_from_slice(t);
            }
        }
        out
    }

    pub(super) fn term(&self) -> &'static [u8] {
        self.term
    }
}

/// An event made of `other` lines (as [`Event::other_lines`] gives them) and `data`.
pub(super) fn make_event(other: &[u8], data: &str, term: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(other.len() + data.len() + 16);
    out.extend_from_slice(other);
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(term);
    }
    out.extend_from_slice(term);
    out
}

/// The value of `line` if it is the field `name` (`name:value`, one space after the colon
/// dropped; `name` alone has an empty value).
fn field<'l>(line: &'l [u8], name: &[u8]) -> Option<&'l [u8]> {
    let rest = line.strip_prefix(name)?;
    if rest.is_empty() {
        return Some(rest);
    }
    let value = rest.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// The lines of an event, each with its line ending (`\n`, `\r\n`, `\r`, or none at the end).
fn lines(raw: &[u8]) -> impl Iterator<Item = (&[u8], &'static [u8])> {
    let mut rest = raw;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match memchr2(b'\r', b'\n', rest) {
            Some(at) => {
                let line = &rest[..at];
                let (term, skip): (&'static [u8], usize) =
                    if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') {
                        (b"\r\n", 2)
                    } else if rest[at] == b'\r' {
                        (b"\r", 1)
                    } else {
                        (b"\n", 1)
                    };
                rest = &rest[at + skip..];
                Some((line, term))
            }
            None => {
                let line = rest;
                rest = &[];
                Some((line, b"".as_slice()))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<Bytes>) {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(&Bytes::copy_from_slice(c), &mut out);
        }
        let pieces = out
            .into_iter()
            .map(|p| match p {
                Piece::Event(b) => b.to_vec(),
                Piece::Stray(b) => {
                    let mut v = b"<stray>".to_vec();
                    v.extend_from_slice(&b);
                    v
                }
            })
            .collect();
        (pieces, s.finish())
    }

    #[test]
    fn events_end_at_blank_lines_whatever_the_line_endings() {
        let stream =
            b"data: a\n\n: keep-alive\n\nevent: x\r\ndata: b\r\ndata: c\r\n\r\ndata: d\r\rdata: e";
        let (pieces, rest) = split(&[stream]);
        assert_eq!(
            pieces,
            [
                b"data: a\n\n".to_vec(),
                b": keep-alive\n\n".to_vec(),
                b"event: x\r\ndata: b\r\ndata: c\r\n\r\n".to_vec(),
                b"data: d\r\r".to_vec(),
            ]
        );
        assert_eq!(rest.as_deref(), Some(&b"data: e"[..]));
    }

    #[test]
    fn a_split_anywhere_gives_the_same_events() {
        let stream: &[u8] = b"data: a\r\n\r\nevent: x\ndata: b\n\ndata: c\r\rdata: d\n\n";
        let (whole, _) = split(&[stream]);
        for cut in 0..=stream.len() {
            let (pieces, rest) = split(&[&stream[..cut], &stream[cut..]]);
            let joined: Vec<u8> = pieces
                .iter()
                .flat_map(|p| p.strip_prefix(b"<stray>").unwrap_or(p).to_vec())
                .collect();
            assert_eq!(joined, stream, "cut {cut}");
            assert!(rest.is_none());
            let events: Vec<_> = pieces
                .iter()
                .filter(|p| !p.starts_with(b"<stray>"))
                .collect();
            let strip = |e: &Vec<u8>| {
                let mut e = e.clone();
                while e.last() == Some(&b'\n') || e.last() == Some(&b'\r') {
                    e.pop();
                }
                e
            };
            let whole_trimmed: Vec<_> = whole
                .iter()
                .filter(|p| !p.starts_with(b"<stray>"))
                .map(strip)
                .collect();
            assert_eq!(
                events.into_iter().map(strip).collect::<Vec<_>>(),
                whole_trimmed,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn data_lines_join_and_render_back() {
        let raw = b"event: e\ndata: {\"a\":\ndata:1}\nid: 7\n\n";
        let event = Event::read(raw);
        assert_eq!(event.data.as_deref(), Some("{\"a\":\n1}"));
        assert_eq!(
            event.render("{\"a\":2}"),
            b"event: e\ndata: {\"a\":2}\nid: 7\n\n".to_vec()
        );
        assert_eq!(Event::read(b": c\n\n").data, None);
        assert_eq!(Event::read(b"data\n\n").data.as_deref(), Some(""));
        assert_eq!(Event::read(b"data:x\r\n\r\n").term(), b"\r\n");
        assert_eq!(
            Event::read(raw).other_lines(),
            b"event: e\nid: 7\n".to_vec()
        );
    }
}
