//! An incremental JSON scanner for webhook bodies: it validates the whole document as it
//! arrives, chunk by chunk, and keeps only the fields a push event needs, each cut to a
//! bounded size. So the memory a request holds is bounded by what is kept (a few kilobytes),
//! never by the body's size: a 25 MiB push with thousands of changed files, or a commit
//! message of 20 MB, costs the same as a small one.
//!
//! serde_json cannot do this: it parses from a complete slice or from a blocking reader, and it
//! buffers every string it hands to a visitor in full. The grammar here is RFC 8259's: one
//! object at the root, strings of valid UTF-8 without raw control characters and with
//! well-formed escapes (surrogates in pairs), numbers in JSON's syntax, and nothing but
//! whitespace after the root. Its results are checked against serde_json's on random documents
//! cut into random chunks.

use super::gitlab::{Commit, MAX_TEXT_CHARS, Payload, Project};

/// Deepest nesting accepted (serde_json's default recursion limit).
const MAX_DEPTH: usize = 128;
/// Longest identifier kept (`ref`, `after`, an object kind, a commit id); a longer one is an
/// error naming the field.
pub const MAX_ID_BYTES: usize = 1024;
/// Most commits kept: the newest, as GitLab lists at most 20 and the head is the last.
pub const MAX_COMMITS_KEPT: usize = 20;
/// Longest key compared with the ones read; a longer key is one that is not read.
const MAX_KEY_BYTES: usize = 32;

/// Which kept field a value goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ObjectKind,
    ProjectId,
    Ref,
    Before,
    After,
    UserUsername,
    UserName,
    TotalCommitsCount,
    RefProtected,
    ProjectIdInProject,
    CommitId,
    CommitTitle,
    CommitMessage,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::ObjectKind => "object_kind",
            Field::ProjectId => "project_id",
            Field::Ref => "ref",
            Field::Before => "before",
            Field::After => "after",
            Field::UserUsername => "user_username",
            Field::UserName => "user_name",
            Field::TotalCommitsCount => "total_commits_count",
            Field::RefProtected => "ref_protected",
            Field::ProjectIdInProject | Field::CommitId => "id",
            Field::CommitTitle => "title",
            Field::CommitMessage => "message",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Field::ProjectId | Field::TotalCommitsCount | Field::ProjectIdInProject => Kind::U64,
            Field::RefProtected => Kind::Bool,
            Field::ObjectKind | Field::Ref | Field::Before | Field::After | Field::CommitId => {
                Kind::Id
            }
            Field::UserUsername | Field::UserName | Field::CommitTitle => Kind::Text,
            Field::CommitMessage => Kind::FirstLine,
        }
    }

    /// Whether `null` stands for "absent" (an `Option`), rather than a wrong type.
    fn nullable(self) -> bool {
        self != Field::CommitId
    }
}

/// What a kept field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    U64,
    Bool,
    /// A string kept whole, up to [`MAX_ID_BYTES`].
    Id,
    /// Free text, cut to [`MAX_TEXT_CHARS`] characters.
    Text,
    /// The first line of free text, cut likewise.
    FirstLine,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::U64 => "an unsigned integer",
            Kind::Bool => "a boolean",
            Kind::Id | Kind::Text | Kind::FirstLine => "a string",
        }
    }
}

/// Where the value about to be read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The document: must be an object.
    Document,
    /// Validated and dropped.
    Skip,
    /// `project`: an object (or null).
    Project,
    /// `commits`: an array of objects.
    Commits,
    /// An element of `commits`.
    Commit,
    /// A kept scalar.
    Field(Field),
}

/// What a container is, for routing its keys and elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Root,
    Project,
    Commits,
    Commit,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    object: bool,
    context: Context,
    /// Elements of an array seen so far (for paths like `commits[3]`).
    count: usize,
}

/// What the grammar expects next, between tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Value,
    ValueOrEnd,
    KeyOrEnd,
    Key,
    Colon,
    CommaOrEnd,
    Done,
}

/// A string's escape state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// Inside `\uXXXX`: digits read and their value so far.
    Unicode(u8, u32),
    /// A high surrogate was read; a `\` must follow.
    LowBackslash(u32),
    /// ... then a `u`.
    LowU(u32),
    /// ... then four digits.
    Low(u32, u8, u32),
}

/// The token being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    None,
    /// A string that is a key (`key == true`) or a value going to `slot`.
    Str {
        key: bool,
        slot: Slot,
        escape: Escape,
        /// UTF-8 continuation bytes still due, and the range the next one must be in.
        need: u8,
        lo: u8,
        hi: u8,
    },
    Number {
        slot: Slot,
        state: Num,
    },
    Literal {
        slot: Slot,
        word: &'static [u8],
        at: u8,
    },
}

/// Positions in JSON's number grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    /// Whether a number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }

    fn next(self, b: u8) -> Option<Num> {
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::E,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::E, b'+' | b'-') => Num::ESign,
            (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Num::Exp,
            _ => return None,
        })
    }
}

/// The commit being read, before it is known whether it is kept.
#[derive(Debug, Default)]
struct Partial {
    commit: Commit,
    seen: u8,
}

/// The scanner: feed it the body's chunks, then [`Scanner::finish`].
#[derive(Debug)]
pub struct Scanner {
    stack: Vec<Frame>,
    expect: Expect,
    token: Token,
    /// The slot of the value that follows the key just read.
    next: Slot,
    /// Bytes consumed, for error positions.
    offset: u64,
    /// The current string's kept bytes (a key, or a kept value).
    text: Vec<u8>,
    /// Characters kept of the current string, and whether keeping stopped (cut, or a
    /// first line ended), and whether an identifier or key was too long.
    chars: usize,
    stopped: bool,
    too_long: bool,
    /// A first line ended at a line feed (so a carriage return before it is not kept).
    line_ended: bool,
    /// The current string's caps: bytes, characters, and whether only its first line is kept.
    cap_bytes: usize,
    cap_chars: usize,
    cap_first_line: bool,
    /// The current number's text, when it is kept.
    number: Vec<u8>,
    payload: Payload,
    /// Root fields and `project.id` seen, by bit, to refuse duplicates.
    seen: u32,
    commit: Option<Partial>,
    failed: Option<String>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    /// A scanner at the start of a document.
    pub fn new() -> Self {
        Self {
            stack: Vec::new(),
            expect: Expect::Value,
            token: Token::None,
            next: Slot::Document,
            offset: 0,
            text: Vec::new(),
            chars: 0,
            stopped: false,
            too_long: false,
            line_ended: false,
            cap_bytes: 0,
            cap_chars: 0,
            cap_first_line: false,
            number: Vec::new(),
            payload: Payload::default(),
            seen: 0,
            commit: None,
            failed: None,
        }
    }

    /// Bytes the scanner holds for what it keeps: bounded by the caps on kept fields,
    /// whatever was fed.
    pub fn retained(&self) -> usize {
        let commit = |c: &Commit| {
            c.id.capacity()
                + c.title.as_ref().map_or(0, String::capacity)
                + c.message.as_ref().map_or(0, String::capacity)
        };
        let p = &self.payload;
        let strings = [
            &p.object_kind,
            &p.git_ref,
            &p.before,
            &p.after,
            &p.user_username,
            &p.user_name,
        ];
        self.stack.capacity() * std::mem::size_of::<Frame>()
            + self.text.capacity()
            + self.number.capacity()
            + strings
                .iter()
                .map(|s| s.as_ref().map_or(0, String::capacity))
                .sum::<usize>()
            + p.commits.iter().map(commit).sum::<usize>()
            + self.commit.as_ref().map_or(0, |c| commit(&c.commit))
    }

    /// Reads the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.run(chunk);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// The kept fields, once the whole body was fed.
    pub fn finish(mut self) -> Result<Payload, String> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        // A number can end only at a delimiter; the end of the body is one.
        if let Token::Number { slot, state } = self.token {
            if !state.complete() {
                return Err(self.syntax("the body ends inside a number"));
            }
            self.token = Token::None;
            self.end_number(slot)?;
        }
        if self.expect != Expect::Done || self.token != Token::None {
            return Err(self.syntax("the body ends before the document does"));
        }
        Ok(self.payload)
    }

    fn syntax(&self, what: &str) -> String {
        format!("malformed JSON: {what} at byte {}", self.offset)
    }

    fn syntax_at(&self, ahead: usize, what: &str) -> String {
        format!(
            "malformed JSON: {what} at byte {}",
            self.offset + ahead as u64
        )
    }

    /// The path of the value in `slot` being read now, as `commits[2].title`.
    fn path(&self, slot: Slot) -> String {
        let mut path = String::new();
        for (i, frame) in self.stack.iter().enumerate() {
            match frame.context {
                Context::Project => path.push_str("project."),
                Context::Commits => path.push_str("commits"),
                Context::Commit => {
                    let n = i
                        .checked_sub(1)
                        .and_then(|p| self.stack.get(p))
                        .map_or(0, |f| f.count.saturating_sub(1));
                    path.push_str(&format!("[{n}]."));
                }
                Context::Root | Context::Other => {}
            }
        }
        match slot {
            Slot::Field(f) => path.push_str(f.name()),
            Slot::Project => path.push_str("project"),
            Slot::Commits => path.push_str("commits"),
            Slot::Commit => {
                let n = self.stack.last().map_or(0, |f| f.count.saturating_sub(1));
                path.push_str(&format!("[{n}]"));
            }
            Slot::Document | Slot::Skip => {}
        }
        path
    }

    fn wrong_type(&self, slot: Slot, found: &str) -> String {
        let expected = match slot {
            Slot::Document => return self.syntax(&format!("the body is {found}, not an object")),
            Slot::Project | Slot::Commit => "an object",
            Slot::Commits => "an array",
            Slot::Field(f) => f.kind().expected(),
            Slot::Skip => "anything",
        };
        format!(
            "malformed JSON at {}: invalid type: {found}, expected {expected}",
            self.path(slot)
        )
    }

    fn run(&mut self, chunk: &[u8]) -> Result<(), String> {
        let mut i = 0;
        while i < chunk.len() {
            match self.token {
                Token::Str { .. } => {
                    let used = self.string(&chunk[i..])?;
                    i += used;
                    self.offset += used as u64;
                    continue;
                }
                Token::Number { slot, state } => {
                    let b = chunk[i];
                    if let Some(next) = state.next(b) {
                        if slot != Slot::Skip && self.number.len() < 40 {
                            self.number.push(b);
                        }
                        self.token = Token::Number { slot, state: next };
                        i += 1;
                        self.offset += 1;
                        continue;
                    }
                    if !state.complete() {
                        return Err(self.syntax("a malformed number"));
                    }
                    self.token = Token::None;
                    self.end_number(slot)?;
                    // The delimiter is read below as structure.
                }
                Token::Literal { slot, word, at } => {
                    if chunk[i] != word[usize::from(at)] {
                        return Err(self.syntax("an unknown literal"));
                    }
                    i += 1;
                    self.offset += 1;
                    if usize::from(at) + 1 == word.len() {
                        self.token = Token::None;
                        self.end_literal(slot, word)?;
                    } else {
                        self.token = Token::Literal {
                            slot,
                            word,
                            at: at + 1,
                        };
                    }
                    continue;
                }
                Token::None => {}
            }
            self.structure(chunk[i])?;
            i += 1;
            self.offset += 1;
        }
        Ok(())
    }

    /// One byte between tokens.
    fn structure(&mut self, b: u8) -> Result<(), String> {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return Ok(());
        }
        match self.expect {
            Expect::Value | Expect::ValueOrEnd => {
                if b == b']' && self.expect == Expect::ValueOrEnd {
                    return self.close(false);
                }
                let slot = self.value_slot();
                self.value(slot, b)
            }
            Expect::KeyOrEnd | Expect::Key => match b {
                b'"' => {
                    self.begin_string(true, Slot::Skip);
                    Ok(())
                }
                b'}' if self.expect == Expect::KeyOrEnd => self.close(true),
                _ => Err(self.syntax("expected a key")),
            },
            Expect::Colon if b == b':' => {
                self.expect = Expect::Value;
                Ok(())
            }
            Expect::Colon => Err(self.syntax("expected ':'")),
            Expect::CommaOrEnd => {
                let object = self.stack.last().is_some_and(|f| f.object);
                match b {
                    b',' if object => {
                        self.expect = Expect::Key;
                        Ok(())
                    }
                    b',' => {
                        self.expect = Expect::Value;
                        Ok(())
                    }
                    b'}' if object => self.close(true),
                    b']' if !object => self.close(false),
                    _ if object => Err(self.syntax("expected ',' or '}'")),
                    _ => Err(self.syntax("expected ',' or ']'")),
                }
            }
            Expect::Done => Err(self.syntax("trailing characters after the document")),
        }
    }

    /// The slot of the value starting now: the key's, or the array's element's.
    fn value_slot(&mut self) -> Slot {
        match self.stack.last_mut() {
            None => Slot::Document,
            Some(frame) if frame.object => self.next,
            Some(frame) => {
                frame.count += 1;
                if frame.context == Context::Commits {
                    Slot::Commit
                } else {
                    Slot::Skip
                }
            }
        }
    }

    fn value(&mut self, slot: Slot, b: u8) -> Result<(), String> {
        match b {
            b'{' => self.open(slot, true),
            b'[' => self.open(slot, false),
            b'"' => match slot {
                Slot::Skip => {
                    self.begin_string(false, slot);
                    Ok(())
                }
                Slot::Field(f) if matches!(f.kind(), Kind::Id | Kind::Text | Kind::FirstLine) => {
                    self.begin_string(false, slot);
                    Ok(())
                }
                _ => Err(self.wrong_type(slot, "a string")),
            },
            b'-' | b'0'..=b'9' => {
                match slot {
                    Slot::Skip => {}
                    Slot::Field(f) if f.kind() == Kind::U64 => {}
                    _ => return Err(self.wrong_type(slot, "a number")),
                }
                self.number.clear();
                self.number.push(b);
                let state = if b == b'-' {
                    Num::Minus
                } else if b == b'0' {
                    Num::Zero
                } else {
                    Num::Int
                };
                self.token = Token::Number { slot, state };
                Ok(())
            }
            b't' | b'f' | b'n' => {
                let word: &'static [u8] = match b {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                self.token = Token::Literal { slot, word, at: 1 };
                Ok(())
            }
            _ => Err(self.syntax("expected a value")),
        }
    }

    fn open(&mut self, slot: Slot, object: bool) -> Result<(), String> {
        let context = match (slot, object) {
            (Slot::Document, true) => Context::Root,
            (Slot::Project, true) => Context::Project,
            (Slot::Commits, false) => Context::Commits,
            (Slot::Commit, true) => {
                self.commit = Some(Partial::default());
                Context::Commit
            }
            (Slot::Skip, _) => Context::Other,
            (_, true) => return Err(self.wrong_type(slot, "an object")),
            (_, false) => return Err(self.wrong_type(slot, "an array")),
        };
        self.first_time(slot)?;
        if self.stack.len() == MAX_DEPTH {
            return Err(self.syntax("nesting deeper than 128"));
        }
        if context == Context::Project {
            self.payload.project = Some(Project::default());
        }
        self.stack.push(Frame {
            object,
            context,
            count: 0,
        });
        self.expect = if object {
            Expect::KeyOrEnd
        } else {
            Expect::ValueOrEnd
        };
        Ok(())
    }

    fn close(&mut self, object: bool) -> Result<(), String> {
        match self.stack.pop() {
            Some(frame) if frame.object == object => {
                if frame.context == Context::Commit
                    && let Some(partial) = self.commit.take()
                {
                    let commits = &mut self.payload.commits;
                    if commits.len() == MAX_COMMITS_KEPT {
                        commits.remove(0);
                    }
                    commits.push(partial.commit);
                }
                self.value_done();
                Ok(())
            }
            _ => Err(self.syntax("a mismatched bracket")),
        }
    }

    fn value_done(&mut self) {
        self.expect = if self.stack.is_empty() {
            Expect::Done
        } else {
            Expect::CommaOrEnd
        };
    }

    fn begin_string(&mut self, key: bool, slot: Slot) {
        self.text.clear();
        self.chars = 0;
        self.stopped = false;
        self.too_long = false;
        self.line_ended = false;
        (self.cap_bytes, self.cap_chars, self.cap_first_line) = match (key, slot) {
            (true, _) => (MAX_KEY_BYTES, usize::MAX, false),
            (false, Slot::Field(f)) => match f.kind() {
                Kind::Id => (MAX_ID_BYTES, usize::MAX, false),
                Kind::Text => (usize::MAX, MAX_TEXT_CHARS, false),
                Kind::FirstLine => (usize::MAX, MAX_TEXT_CHARS, true),
                Kind::U64 | Kind::Bool => (0, 0, false),
            },
            (false, _) => (0, 0, false),
        };
        self.token = Token::Str {
            key,
            slot,
            escape: Escape::None,
            need: 0,
            lo: 0,
            hi: 0,
        };
    }

    /// Keeps one byte of the current string's decoded text, within its caps.
    fn keep(&mut self, b: u8) {
        if self.stopped {
            return;
        }
        if self.cap_first_line && b == b'\n' {
            self.stopped = true;
            self.line_ended = true;
            return;
        }
        if b & 0xC0 != 0x80 {
            if self.chars == self.cap_chars {
                self.stopped = true;
                return;
            }
            self.chars += 1;
        }
        if self.text.len() == self.cap_bytes {
            self.stopped = true;
            self.too_long = true;
            return;
        }
        self.text.push(b);
    }

    /// Keeps a run of printable ASCII (one character per byte, no line feed), within the caps.
    fn keep_ascii(&mut self, run: &[u8]) {
        if self.stopped || run.is_empty() {
            return;
        }
        let room_chars = self.cap_chars - self.chars;
        let room_bytes = self.cap_bytes - self.text.len();
        let n = run.len().min(room_chars).min(room_bytes);
        self.text.extend_from_slice(&run[..n]);
        self.chars += n;
        if n < run.len() {
            self.stopped = true;
            self.too_long = n == room_bytes && room_bytes < room_chars;
        }
    }

    fn keep_char(&mut self, c: char) {
        let mut buf = [0u8; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            self.keep(b);
        }
    }

    /// Reads string bytes from `bytes` until the string ends or the chunk does; returns how
    /// many bytes it used.
    fn string(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let Token::Str {
            key,
            slot,
            mut escape,
            mut need,
            mut lo,
            mut hi,
        } = self.token
        else {
            return Ok(0);
        };
        let keeping = self.cap_bytes > 0;
        let mut used = 0;
        let mut ended = false;
        while used < bytes.len() {
            if need == 0 && escape == Escape::None {
                // The common case, in one pass: printable ASCII up to a quote or backslash.
                let run = bytes[used..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b))
                    .unwrap_or(bytes.len() - used);
                if keeping {
                    self.keep_ascii(&bytes[used..used + run]);
                }
                used += run;
                if used == bytes.len() {
                    break;
                }
            }
            let b = bytes[used];
            used += 1;
            if need > 0 {
                if b < lo || b > hi {
                    return Err(self.syntax_at(used - 1, "invalid UTF-8 in a string"));
                }
                need -= 1;
                (lo, hi) = (0x80, 0xBF);
                if keeping {
                    self.keep(b);
                }
                continue;
            }
            match escape {
                Escape::None => match b {
                    b'"' => {
                        ended = true;
                        break;
                    }
                    b'\\' => escape = Escape::Backslash,
                    0x00..=0x1F => {
                        return Err(self.syntax_at(used - 1, "a control character in a string"));
                    }
                    0x20..=0x7F => {
                        if keeping {
                            self.keep(b);
                        }
                    }
                    _ => {
                        (need, lo, hi) = match b {
                            0xC2..=0xDF => (1, 0x80, 0xBF),
                            0xE0 => (2, 0xA0, 0xBF),
                            0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
                            0xED => (2, 0x80, 0x9F),
                            0xF0 => (3, 0x90, 0xBF),
                            0xF1..=0xF3 => (3, 0x80, 0xBF),
                            0xF4 => (3, 0x80, 0x8F),
                            _ => {
                                return Err(self.syntax_at(used - 1, "invalid UTF-8 in a string"));
                            }
                        };
                        if keeping {
                            self.keep(b);
                        }
                    }
                },
                other => escape = self.escaped(keeping, other, b, used - 1)?,
            }
        }
        if !ended {
            self.token = Token::Str {
                key,
                slot,
                escape,
                need,
                lo,
                hi,
            };
            return Ok(used);
        }
        self.token = Token::None;
        if key {
            self.end_key();
        } else {
            self.end_string(slot)?;
        }
        Ok(used)
    }

    /// One byte of an escape sequence in state `escape`: the state after it (a decoded
    /// character is kept, when `keeping`). `at` is the byte's position in the chunk.
    fn escaped(
        &mut self,
        keeping: bool,
        escape: Escape,
        b: u8,
        at: usize,
    ) -> Result<Escape, String> {
        let c = match escape {
            Escape::None => return Ok(Escape::None),
            Escape::Backslash => match b {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => return Ok(Escape::Unicode(0, 0)),
                _ => return Err(self.syntax_at(at, "an invalid escape in a string")),
            },
            Escape::Unicode(n, acc) | Escape::Low(_, n, acc) => {
                let Some(d) = char::from(b).to_digit(16) else {
                    return Err(self.syntax_at(at, "an invalid \\u escape"));
                };
                let acc = acc << 4 | d;
                let high = match escape {
                    Escape::Low(high, ..) => Some(high),
                    _ => None,
                };
                if n < 3 {
                    return Ok(match high {
                        Some(h) => Escape::Low(h, n + 1, acc),
                        None => Escape::Unicode(n + 1, acc),
                    });
                }
                let code = match high {
                    None if (0xD800..0xDC00).contains(&acc) => {
                        return Ok(Escape::LowBackslash(acc));
                    }
                    None if (0xDC00..0xE000).contains(&acc) => None,
                    None => Some(acc),
                    Some(h) if (0xDC00..0xE000).contains(&acc) => {
                        Some(0x10000 + ((h - 0xD800) << 10) + (acc - 0xDC00))
                    }
                    Some(_) => None,
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| self.syntax_at(at, "a lone surrogate in a \\u escape"))?
            }
            Escape::LowBackslash(h) if b == b'\\' => return Ok(Escape::LowU(h)),
            Escape::LowU(h) if b == b'u' => return Ok(Escape::Low(h, 0, 0)),
            Escape::LowBackslash(_) | Escape::LowU(_) => {
                return Err(self.syntax_at(at, "a lone surrogate in a \\u escape"));
            }
        };
        if keeping {
            self.keep_char(c);
        }
        Ok(Escape::None)
    }

    fn end_key(&mut self) {
        let context = self.stack.last().map_or(Context::Other, |f| f.context);
        let key: &[u8] = if self.too_long { b"" } else { &self.text };
        self.next = match (context, key) {
            (Context::Root, b"object_kind") => Slot::Field(Field::ObjectKind),
            (Context::Root, b"project_id") => Slot::Field(Field::ProjectId),
            (Context::Root, b"project") => Slot::Project,
            (Context::Root, b"ref") => Slot::Field(Field::Ref),
            (Context::Root, b"before") => Slot::Field(Field::Before),
            (Context::Root, b"after") => Slot::Field(Field::After),
            (Context::Root, b"user_username") => Slot::Field(Field::UserUsername),
            (Context::Root, b"user_name") => Slot::Field(Field::UserName),
            (Context::Root, b"commits") => Slot::Commits,
            (Context::Root, b"total_commits_count") => Slot::Field(Field::TotalCommitsCount),
            (Context::Root, b"ref_protected") => Slot::Field(Field::RefProtected),
            (Context::Project, b"id") => Slot::Field(Field::ProjectIdInProject),
            (Context::Commit, b"id") => Slot::Field(Field::CommitId),
            (Context::Commit, b"title") => Slot::Field(Field::CommitTitle),
            (Context::Commit, b"message") => Slot::Field(Field::CommitMessage),
            _ => Slot::Skip,
        };
        self.expect = Expect::Colon;
    }

    /// Marks `slot` as seen; an error if it was already.
    fn first_time(&mut self, slot: Slot) -> Result<(), String> {
        let bit = |n: u32| 1u32 << n;
        let mask = match slot {
            Slot::Field(Field::CommitId) => bit(0),
            Slot::Field(Field::CommitTitle) => bit(1),
            Slot::Field(Field::CommitMessage) => bit(2),
            Slot::Field(f) => bit(3 + f as u32),
            Slot::Project => bit(30),
            Slot::Commits => bit(31),
            Slot::Document | Slot::Skip | Slot::Commit => return Ok(()),
        };
        let seen = match (slot, self.commit.as_mut()) {
            (Slot::Field(Field::CommitId | Field::CommitTitle | Field::CommitMessage), Some(p)) => {
                let was = u32::from(p.seen) & mask != 0;
                p.seen |= mask as u8;
                was
            }
            _ => {
                let was = self.seen & mask != 0;
                self.seen |= mask;
                was
            }
        };
        if seen {
            return Err(format!(
                "malformed JSON at {}: duplicate field",
                self.path(slot)
            ));
        }
        Ok(())
    }

    fn end_string(&mut self, slot: Slot) -> Result<(), String> {
        let Slot::Field(field) = slot else {
            self.value_done();
            return Ok(());
        };
        self.first_time(slot)?;
        if self.too_long {
            return Err(format!(
                "malformed JSON at {}: longer than {MAX_ID_BYTES} bytes",
                self.path(slot)
            ));
        }
        let mut text = String::from_utf8(std::mem::take(&mut self.text))
            .map_err(|_| self.syntax("invalid UTF-8 in a string"))?;
        if self.line_ended && text.ends_with('\r') {
            text.pop();
        }
        let payload = &mut self.payload;
        let commit = self.commit.as_mut().map(|p| &mut p.commit);
        match (field, commit) {
            (Field::ObjectKind, _) => payload.object_kind = Some(text),
            (Field::Ref, _) => payload.git_ref = Some(text),
            (Field::Before, _) => payload.before = Some(text),
            (Field::After, _) => payload.after = Some(text),
            (Field::UserUsername, _) => payload.user_username = Some(text),
            (Field::UserName, _) => payload.user_name = Some(text),
            (Field::CommitId, Some(c)) => c.id = text,
            (Field::CommitTitle, Some(c)) => c.title = Some(text),
            (Field::CommitMessage, Some(c)) => c.message = Some(text),
            _ => {}
        }
        self.value_done();
        Ok(())
    }

    fn end_number(&mut self, slot: Slot) -> Result<(), String> {
        let Slot::Field(field) = slot else {
            self.value_done();
            return Ok(());
        };
        self.first_time(slot)?;
        let text = String::from_utf8_lossy(&self.number).into_owned();
        let value: u64 = text.parse().map_err(|_| {
            format!(
                "malformed JSON at {}: {text} is not {}",
                self.path(slot),
                Kind::U64.expected()
            )
        })?;
        match field {
            Field::ProjectId => self.payload.project_id = Some(value),
            Field::TotalCommitsCount => self.payload.total_commits_count = Some(value),
            Field::ProjectIdInProject => {
                if let Some(p) = self.payload.project.as_mut() {
                    p.id = Some(value);
                }
            }
            _ => {}
        }
        self.value_done();
        Ok(())
    }

    fn end_literal(&mut self, slot: Slot, word: &'static [u8]) -> Result<(), String> {
        match (slot, word) {
            (Slot::Skip, _) => {}
            (Slot::Project, b"null") => self.first_time(slot)?,
            (Slot::Field(f), b"null") if f.nullable() => self.first_time(slot)?,
            (Slot::Field(Field::RefProtected), b"true" | b"false") => {
                self.first_time(slot)?;
                self.payload.ref_protected = Some(word == b"true");
            }
            (_, b"null") => return Err(self.wrong_type(slot, "null")),
            _ => return Err(self.wrong_type(slot, "a boolean")),
        }
        self.value_done();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
