//! Splitting the byte stream a client sends into JSON values, as QMP does: no
//! delimiter is required between two requests, so the end of a value is found by
//! counting braces and brackets outside strings.
//!
//! Limits (QEMU has the same kind): one value at most [`MAX_MESSAGE_BYTES`] and
//! [`MAX_NESTING`] levels deep. A value over a limit is answered with one error and
//! skipped without being buffered; the connection stays usable.

/// Longest accepted request, bytes.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Deepest accepted nesting of objects and arrays.
pub const MAX_NESTING: usize = 1024;

/// What the framer found in the input.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// The bytes of one complete top-level JSON value (not yet parsed).
    Value(Vec<u8>),
    /// The input broke a rule; the message is QEMU's error text.
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Between values.
    Idle,
    /// Inside an object or array.
    Nested,
    /// A top-level scalar (number, keyword or string).
    Scalar,
    /// Skipping an oversized value: counting depth without buffering.
    Skipping,
}

/// Incremental splitter of a QMP input stream into top-level JSON values.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    mode: Mode,
    depth: usize,
    in_string: bool,
    escape: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new()
    }
}

fn is_delimiter(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'}' | b'[' | b']' | b',' | b':'
    )
}

impl Framer {
    /// A framer at the start of a stream.
    pub fn new() -> Self {
        Framer {
            buf: Vec::new(),
            mode: Mode::Idle,
            depth: 0,
            in_string: false,
            escape: false,
        }
    }

    /// Feeds `input`; complete values and errors are appended to `out` in order.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<Frame>) {
        for &b in input {
            self.byte(b, out);
        }
    }

    /// At end of input: a pending top-level scalar ends here.
    pub fn finish(&mut self, out: &mut Vec<Frame>) {
        if self.mode == Mode::Scalar && !self.in_string {
            self.end_value(out);
        }
    }

    fn end_value(&mut self, out: &mut Vec<Frame>) {
        out.push(Frame::Value(std::mem::take(&mut self.buf)));
        self.mode = Mode::Idle;
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
    }

    fn overflow(&mut self, out: &mut Vec<Frame>, msg: &str) {
        out.push(Frame::Error(msg.to_string()));
        self.buf = Vec::new();
        self.mode = Mode::Skipping;
    }

    /// Tracks strings and escapes; returns true when `b` was inside a string.
    fn string_byte(&mut self, b: u8) -> bool {
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return true;
        }
        if b == b'"' {
            self.in_string = true;
            return true;
        }
        false
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        match self.mode {
            Mode::Idle => match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'{' | b'[' => {
                    self.mode = Mode::Nested;
                    self.depth = 1;
                    self.buf.push(b);
                }
                b'}' | b']' | b',' | b':' => out.push(Frame::Error(format!(
                    "JSON parse error, stray '{}'",
                    b as char
                ))),
                _ => {
                    self.mode = Mode::Scalar;
                    self.buf.push(b);
                    if b == b'"' {
                        self.in_string = true;
                    }
                }
            },
            Mode::Scalar => {
                if self.in_string {
                    self.buf.push(b);
                    self.string_byte(b);
                    if !self.in_string {
                        self.end_value(out);
                    }
                } else if is_delimiter(b) {
                    self.end_value(out);
                    // The delimiter may begin the next value (or be stray).
                    self.byte(b, out);
                    return;
                } else {
                    self.buf.push(b);
                }
                if self.mode == Mode::Scalar && self.buf.len() > MAX_MESSAGE_BYTES {
                    self.overflow(out, "JSON token size limit exceeded");
                }
            }
            Mode::Nested => {
                self.buf.push(b);
                if !self.string_byte(b) {
                    match b {
                        b'{' | b'[' => {
                            self.depth += 1;
                            if self.depth > MAX_NESTING {
                                self.overflow(out, "JSON nesting depth limit exceeded");
                                return;
                            }
                        }
                        b'}' | b']' => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                self.end_value(out);
                                return;
                            }
                        }
                        _ => {}
                    }
                }
                if self.buf.len() > MAX_MESSAGE_BYTES {
                    self.overflow(out, "JSON token size limit exceeded");
                }
            }
            Mode::Skipping => {
                if self.string_byte(b) {
                    return;
                }
                if self.depth == 0 {
                    // An oversized scalar ends at the next delimiter.
                    if is_delimiter(b) {
                        self.mode = Mode::Idle;
                        self.byte(b, out);
                    }
                    return;
                }
                match b {
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            self.mode = Mode::Idle;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        f.push(input, &mut out);
        f.finish(&mut out);
        out
    }

    fn v(s: &str) -> Frame {
        Frame::Value(s.as_bytes().to_vec())
    }

    #[test]
    fn values_back_to_back_without_newlines() {
        assert_eq!(
            frames(br#"{"execute":"a"}{"execute":"b"} [1,{"x":"}"}]"#),
            vec![
                v(r#"{"execute":"a"}"#),
                v(r#"{"execute":"b"}"#),
                v(r#"[1,{"x":"}"}]"#)
            ]
        );
    }

    #[test]
    fn split_anywhere() {
        let input = br#"{"execute": "x", "arguments": {"s": "a\"}{b"}}"#;
        for cut in 0..input.len() {
            let mut f = Framer::new();
            let mut out = Vec::new();
            f.push(&input[..cut], &mut out);
            f.push(&input[cut..], &mut out);
            assert_eq!(out, vec![Frame::Value(input.to_vec())], "cut at {cut}");
        }
    }

    #[test]
    fn scalars_and_strays() {
        assert_eq!(
            frames(b"42 true \"s{\" }"),
            vec![
                v("42"),
                v("true"),
                v("\"s{\""),
                Frame::Error("JSON parse error, stray '}'".into())
            ]
        );
        assert_eq!(frames(b"1{}"), vec![v("1"), v("{}")]);
    }

    #[test]
    fn oversized_value_is_skipped_with_one_error() {
        let mut input = br#"{"execute":"x","arguments":{"data":""#.to_vec();
        input.extend(vec![b'a'; 3 * MAX_MESSAGE_BYTES]);
        input.extend(br#"{["}}{"execute":"next"}"#);
        assert_eq!(
            frames(&input),
            vec![
                Frame::Error("JSON token size limit exceeded".into()),
                v(r#"{"execute":"next"}"#)
            ]
        );
    }

    #[test]
    fn oversized_scalar_is_skipped_to_the_next_delimiter() {
        let mut input = vec![b'a'; 2 * MAX_MESSAGE_BYTES];
        input.extend(b"\n{}");
        assert_eq!(
            frames(&input),
            vec![
                Frame::Error("JSON token size limit exceeded".into()),
                v("{}")
            ]
        );
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut input = vec![b'['; MAX_NESTING + 1];
        input.extend(vec![b']'; MAX_NESTING + 1]);
        input.extend(b"{}");
        assert_eq!(
            frames(&input),
            vec![
                Frame::Error("JSON nesting depth limit exceeded".into()),
                v("{}")
            ]
        );
    }
}
