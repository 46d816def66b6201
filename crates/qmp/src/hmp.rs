//! The human monitor (HMP) behind `human-monitor-command`: the few commands tools use
//! to watch a guest (`info status`, `info migrate`, `xp`), parsed and printed as QEMU
//! 8.2's monitor does, so a script that reads QEMU's text reads Ferry's.
//!
//! Output lines end with `\r\n`, as QEMU's monitor writes them. A command line QEMU
//! would refuse gets QEMU's text for it (`unknown command: 'foo'`, `Try "help xp" for
//! more information`), which is a successful reply, as in QEMU.

use std::fmt::Write as _;
use std::sync::Mutex;

use migration_core::{GuestRam, RunState};
use stats::{MigrationInfo, MigrationStatus};

/// The most text one `xp` may print; a count that could print more is refused (QEMU
/// has no bound; a tool's typo should not build megabytes on the monitor's thread).
pub const MAX_DUMP_OUTPUT_BYTES: usize = 64 << 10;

/// What the HMP commands read from the VM.
pub(crate) trait Target {
    /// The run state (`info status`).
    fn run_state(&self) -> RunState;
    /// Guest RAM (`xp`).
    fn guest_ram(&self) -> GuestRam;
    /// What `query-migrate` reports (`info migrate`); None before any migration.
    fn migration_info(&self) -> Option<MigrationInfo>;
    /// `xp`'s format and size when a command gives none: the last ones given, as in
    /// QEMU, where they are the monitor's globals.
    fn dump_defaults(&self) -> &Mutex<DumpDefaults>;
}

/// The format letter and unit size (bytes) `xp` uses when a command gives none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DumpDefaults {
    format: u8,
    size_bytes: u8,
}

impl Default for DumpDefaults {
    /// QEMU's: hexadecimal words (`/x` of 4 bytes).
    fn default() -> Self {
        DumpDefaults {
            format: b'x',
            size_bytes: 4,
        }
    }
}

/// Text being printed: `line` ends a line with `\r\n`.
#[derive(Default)]
struct Out(String);

impl Out {
    fn line(&mut self, s: &str) {
        self.0.push_str(s);
        self.0.push_str("\r\n");
    }
}

/// A top-level command: its names (`|`-separated aliases, as QEMU's table spells them).
const INFO: &str = "info|i";
const XP: &str = "xp";

/// The `info` subcommands: name, help text (QEMU's).
const INFO_COMMANDS: &[(&str, &str)] = &[
    ("migrate", "show migration status"),
    ("status", "show the current VM status (running|paused)"),
];

fn matches(name: &str, table_name: &str) -> bool {
    table_name.split('|').any(|n| n == name)
}

fn is_space(c: u8) -> bool {
    // C's isspace in the "C" locale.
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn skip_spaces(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    i
}

/// The command name at `i` (after spaces): up to a space or `/`. None on a blank rest.
fn command_name(s: &[u8], i: usize) -> Option<(usize, usize)> {
    let start = skip_spaces(s, i);
    if start == s.len() {
        return None;
    }
    let mut end = start;
    while end < s.len() && s[end] != b'/' && !is_space(s[end]) {
        end += 1;
    }
    Some((start, end))
}

/// Runs one command line and returns what it printed.
pub(crate) fn execute(target: &dyn Target, line: &str) -> String {
    let mut out = Out::default();
    let s = line.as_bytes();
    let Some((start, end)) = command_name(s, 0) else {
        return String::new();
    };
    let name = &line[start..end];
    let rest = skip_spaces(s, end);
    if matches(name, INFO) {
        match command_name(s, rest) {
            // `info` alone lists the info commands, as QEMU's does.
            None => {
                for (sub, help) in INFO_COMMANDS {
                    out.line(&format!("info {sub}  -- {help}"));
                }
            }
            Some((sub_start, sub_end)) => {
                let sub = &line[sub_start..sub_end];
                let Some(&(sub, _)) = INFO_COMMANDS.iter().find(|(n, _)| *n == sub) else {
                    // QEMU quotes the line as typed, from its first byte.
                    out.line(&format!("unknown command: '{}'", &line[..sub_end]));
                    return out.0;
                };
                let args = skip_spaces(s, sub_end);
                if args < s.len() {
                    out.line(&format!("{sub}: extraneous characters at the end of line"));
                    try_help(&mut out, &line[..sub_end]);
                    return out.0;
                }
                match sub {
                    "status" => info_status(&mut out, target.run_state()),
                    _ => info_migrate(&mut out, target.migration_info()),
                }
            }
        }
    } else if matches(name, XP) {
        if let Err(text) = xp(&mut out, target, s, rest) {
            out.line(&text);
            try_help(&mut out, &line[..end]);
        }
    } else {
        out.line(&format!("unknown command: '{}'", &line[..end]));
    }
    out.0
}

/// QEMU's last line after arguments it could not parse.
fn try_help(out: &mut Out, command: &str) {
    out.line(&format!("Try \"help {command}\" for more information"));
}

/// `info status`: `VM status: running`, `VM status: paused`, or `VM status: paused
/// (STATE)` for any other stopped state.
fn info_status(out: &mut Out, state: RunState) {
    match state {
        RunState::Running => out.line("VM status: running"),
        RunState::Paused => out.line("VM status: paused"),
        other => out.line(&format!("VM status: paused ({})", other.name())),
    }
}

/// `info migrate`: QEMU's labels and units for the data `query-migrate` returns
/// (QEMU's `globals:` block, its own settings, is left out); nothing before any
/// migration.
fn info_migrate(out: &mut Out, info: Option<MigrationInfo>) {
    let Some(info) = info else { return };
    match (&info.status, &info.error_desc) {
        (MigrationStatus::Failed, Some(e)) => {
            out.line(&format!("Migration status: failed ({e})"));
        }
        (s, _) => out.line(&format!("Migration status: {}", s.as_str())),
    }
    out.line(&format!("total time: {} ms", info.total_time.unwrap_or(0)));
    if let Some(ms) = info.expected_downtime {
        out.line(&format!("expected downtime: {ms} ms"));
    }
    if let Some(ms) = info.downtime {
        out.line(&format!("downtime: {ms} ms"));
    }
    if let Some(ms) = info.setup_time {
        out.line(&format!("setup: {ms} ms"));
    }
    if let Some(r) = &info.ram {
        out.line(&format!("transferred ram: {} kbytes", r.transferred >> 10));
        out.line(&format!("throughput: {:.2} mbps", r.mbps));
        out.line(&format!("remaining ram: {} kbytes", r.remaining >> 10));
        out.line(&format!("total ram: {} kbytes", r.total >> 10));
        out.line(&format!("duplicate: {} pages", r.duplicate));
        out.line("skipped: 0 pages");
        out.line(&format!("normal: {} pages", r.normal));
        out.line(&format!("normal bytes: {} kbytes", r.normal_bytes >> 10));
        out.line(&format!("dirty sync count: {}", r.dirty_sync_count));
        out.line(&format!("page size: {} kbytes", r.page_size >> 10));
        out.line(&format!("multifd bytes: {} kbytes", r.multifd_bytes >> 10));
        out.line(&format!("pages-per-second: {}", r.pages_per_second));
        if r.dirty_pages_rate != 0 {
            out.line(&format!("dirty pages rate: {} pages", r.dirty_pages_rate));
        }
        if r.postcopy_requests != 0 {
            out.line(&format!("postcopy request count: {}", r.postcopy_requests));
        }
        if r.precopy_bytes != 0 {
            out.line(&format!("precopy ram: {} kbytes", r.precopy_bytes >> 10));
        }
        if r.downtime_bytes != 0 {
            out.line(&format!("downtime ram: {} kbytes", r.downtime_bytes >> 10));
        }
        if r.postcopy_bytes != 0 {
            out.line(&format!("postcopy ram: {} kbytes", r.postcopy_bytes >> 10));
        }
    }
    if let Some(p) = info.cpu_throttle_percentage {
        out.line(&format!("cpu throttle percentage: {p}"));
    }
}

/// `xp /FMT ADDR`: parses the format (updating the defaults, as QEMU does once the
/// format parsed) and the address expression, then dumps. `Err` is the parse error's
/// line (the caller adds QEMU's "Try help" line).
fn xp(out: &mut Out, target: &dyn Target, s: &[u8], mut i: usize) -> Result<(), String> {
    let (count, format, size) = {
        let mut defaults = target
            .dump_defaults()
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if s.get(i) == Some(&b'/') {
            i += 1;
            let mut count: u64 = 1;
            if s.get(i).is_some_and(u8::is_ascii_digit) {
                count = 0;
                while let Some(d) = s.get(i).filter(|c| c.is_ascii_digit()) {
                    count = count.saturating_mul(10).saturating_add(u64::from(d - b'0'));
                    i += 1;
                }
            }
            let (mut format, mut size) = (None, None);
            while let Some(&c) = s.get(i) {
                match c {
                    b'o' | b'd' | b'u' | b'x' | b'i' | b'c' => format = Some(c),
                    b'b' => size = Some(1),
                    b'h' => size = Some(2),
                    b'w' => size = Some(4),
                    b'g' | b'L' => size = Some(8),
                    _ => break,
                }
                i += 1;
            }
            if let Some(&c) = s.get(i).filter(|c| !is_space(**c)) {
                return Err(format!("invalid char in format: '{}'", char::from(c)));
            }
            let format = format.unwrap_or(defaults.format);
            if format == b'i' {
                // Ferry has no disassembler; the defaults are left as they were.
                out.line("xp: format 'i' (disassembly) is not supported by Ferry");
                return Ok(());
            }
            let size = size.unwrap_or(defaults.size_bytes);
            *defaults = DumpDefaults {
                format,
                size_bytes: size,
            };
            (count, format, size)
        } else {
            (1, defaults.format, defaults.size_bytes)
        }
    };
    let mut expr = Expr { s, i };
    let addr = expr.parse()?;
    let i = skip_spaces(s, expr.i);
    if i < s.len() {
        return Err("xp: extraneous characters at the end of line".into());
    }
    memory_dump(out, &target.guest_ram(), count, format, size, addr as u64);
    Ok(())
}

/// Digits a value of `size_bytes` needs in `format` (QEMU's `max_digits`).
fn max_digits(format: u8, size_bytes: u8) -> usize {
    let bits = usize::from(size_bytes) * 8;
    match format {
        b'o' => bits.div_ceil(3),
        b'u' | b'd' => (bits * 10).div_ceil(33),
        b'c' => 0,
        _ => bits / 4,
    }
}

/// The widest one value prints in `format` (the padding is a minimum width).
fn max_value_chars(format: u8, size_bytes: u8) -> usize {
    let digits = max_digits(format, size_bytes);
    match format {
        b'x' => 2 + digits,
        // `%#o` puts a 0 before a nonzero value.
        b'o' => 1 + digits,
        // `'\xNN'`.
        b'c' => 6,
        _ => digits,
    }
}

/// Reads guest-physical `[gpa, gpa + buf.len())` from the RAM blocks (across adjacent
/// ones); false if any byte is not RAM.
fn read_phys(ram: &GuestRam, gpa: u64, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let Some(addr) = gpa.checked_add(done as u64) else {
            return false;
        };
        let Some(b) = ram
            .blocks()
            .iter()
            .find(|b| addr >= b.gpa && addr - b.gpa < b.size_bytes)
        else {
            return false;
        };
        let off = addr - b.gpa;
        let n = (buf.len() - done).min(usize::try_from(b.size_bytes - off).unwrap_or(usize::MAX));
        if !b.memory.read_volatile(off, &mut buf[done..done + n]) {
            return false;
        }
        done += n;
    }
    true
}

/// QEMU's `memory_dump` of guest-physical memory: lines of 8 bytes (byte units) or 16
/// (larger units), each `%016x:` then the values; a line that is not all RAM prints
/// ` Cannot access memory` and ends the dump.
fn memory_dump(out: &mut Out, ram: &GuestRam, count: u64, format: u8, size: u8, addr: u64) {
    let line_bytes: u64 = if size == 1 { 8 } else { 16 };
    // `c` reads bytes whatever the size, over the length the size gave.
    let unit = if format == b'c' { 1 } else { size };
    let per_line = usize::try_from(line_bytes / u64::from(unit)).unwrap_or(1);
    let line_chars = 17 + per_line * (1 + max_value_chars(format, unit)) + 2;
    let max_lines = MAX_DUMP_OUTPUT_BYTES / line_chars;
    let max_count = (max_lines as u64 * line_bytes) / u64::from(size);
    if count > max_count {
        out.line(&format!(
            "xp: count {count} is too large: at most {max_count} for /{}{} \
             (Ferry prints at most {MAX_DUMP_OUTPUT_BYTES} bytes)",
            char::from(format),
            char::from(match size {
                1 => b'b',
                2 => b'h',
                4 => b'w',
                _ => b'g',
            })
        ));
        return;
    }
    let digits = max_digits(format, size);
    let mut len = count * u64::from(size);
    let mut addr = addr;
    let mut buf = [0u8; 16];
    while len > 0 {
        let mut text = format!("{addr:016x}:");
        let l = len.min(line_bytes) as usize;
        if !read_phys(ram, addr, &mut buf[..l]) {
            text.push_str(" Cannot access memory");
            out.line(&text);
            break;
        }
        for chunk in buf[..l].chunks(usize::from(unit)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            let v = u64::from_le_bytes(le);
            // Writing to a String cannot fail.
            let _ = match format {
                b'o' if v == 0 => write!(text, " {:>digits$}", "0"),
                b'o' => write!(text, " {:>digits$}", format!("0{v:o}")),
                b'u' => write!(text, " {v:>digits$}"),
                // Signed only at 8 bytes: smaller units are read zero-extended.
                b'd' => write!(text, " {:>digits$}", v as i64),
                b'c' => write!(text, " {}", printc(chunk[0])),
                _ => write!(text, " 0x{v:0digits$x}"),
            };
        }
        out.line(&text);
        addr = addr.wrapping_add(l as u64);
        len -= l as u64;
    }
}

/// A byte as QEMU's monitor prints a character: quoted, escaped when not printable.
fn printc(c: u8) -> String {
    match c {
        b'\'' => r"'\''".into(),
        b'\\' => r"'\\'".into(),
        b'\n' => r"'\n'".into(),
        b'\r' => r"'\r'".into(),
        32..=126 => format!("'{}'", char::from(c)),
        _ => format!("'\\x{c:02x}'"),
    }
}

/// QEMU's monitor expressions: `+ - ~ ( )`, `* / %`, `& | ^`, `+ -`, numbers in C's
/// bases (`0x` hex, leading `0` octal), `'c'` characters; 64-bit wrapping arithmetic.
/// Registers (`$eax`) are unknown: Ferry's monitor has no CPU view.
struct Expr<'a> {
    s: &'a [u8],
    i: usize,
}

impl Expr<'_> {
    fn peek(&self) -> u8 {
        self.s.get(self.i).copied().unwrap_or(0)
    }

    /// Steps over the current character and the spaces after it.
    fn next(&mut self) {
        if self.i < self.s.len() {
            self.i = skip_spaces(self.s, self.i + 1);
        }
    }

    fn parse(&mut self) -> Result<i64, String> {
        self.i = skip_spaces(self.s, self.i);
        self.sum()
    }

    fn unary(&mut self) -> Result<i64, String> {
        Ok(match self.peek() {
            b'+' => {
                self.next();
                self.unary()?
            }
            b'-' => {
                self.next();
                self.unary()?.wrapping_neg()
            }
            b'~' => {
                self.next();
                !self.unary()?
            }
            b'(' => {
                self.next();
                let n = self.sum()?;
                if self.peek() != b')' {
                    return Err("')' expected".into());
                }
                self.next();
                n
            }
            b'\'' => {
                self.i += 1;
                let Some(&c) = self.s.get(self.i) else {
                    return Err("character constant expected".into());
                };
                self.i += 1;
                if self.peek() != b'\'' {
                    return Err("missing terminating ' character".into());
                }
                self.next();
                // C's char is signed on x86.
                i64::from(c as i8)
            }
            b'$' => return Err("unknown register".into()),
            0 => return Err("unexpected end of expression".into()),
            _ => {
                let n = self.number()?;
                self.i = skip_spaces(self.s, self.i);
                n
            }
        })
    }

    /// C's `strtoull(s, &end, 0)` at the current position.
    fn number(&mut self) -> Result<i64, String> {
        let s = self.s;
        let start = self.i;
        let (radix, digits_at) = if s[start..].starts_with(b"0x") || s[start..].starts_with(b"0X") {
            if s.get(start + 2).is_some_and(u8::is_ascii_hexdigit) {
                (16, start + 2)
            } else {
                // "0x" without a hex digit is the number 0 followed by `x`.
                self.i = start + 1;
                return Ok(0);
            }
        } else if s[start] == b'0' {
            (8, start)
        } else {
            (10, start)
        };
        let mut end = digits_at;
        while end < s.len() && char::from(s[end]).is_digit(radix) {
            end += 1;
        }
        if end == start {
            return Err(format!(
                "invalid char '{}' in expression",
                char::from(s[start])
            ));
        }
        let text = std::str::from_utf8(&s[digits_at..end]).unwrap_or("0");
        let n = u64::from_str_radix(text, radix).map_err(|_| "number too large".to_string())?;
        self.i = end;
        Ok(n as i64)
    }

    fn prod(&mut self) -> Result<i64, String> {
        let mut val = self.unary()?;
        loop {
            let op = self.peek();
            if !matches!(op, b'*' | b'/' | b'%') {
                return Ok(val);
            }
            self.next();
            let val2 = self.unary()?;
            val = match op {
                b'*' => val.wrapping_mul(val2),
                _ if val2 == 0 => return Err("division by zero".into()),
                b'/' => val.wrapping_div(val2),
                _ => val.wrapping_rem(val2),
            };
        }
    }

    fn logic(&mut self) -> Result<i64, String> {
        let mut val = self.prod()?;
        loop {
            let op = self.peek();
            if !matches!(op, b'&' | b'|' | b'^') {
                return Ok(val);
            }
            self.next();
            let val2 = self.prod()?;
            val = match op {
                b'&' => val & val2,
                b'|' => val | val2,
                _ => val ^ val2,
            };
        }
    }

    fn sum(&mut self) -> Result<i64, String> {
        let mut val = self.logic()?;
        loop {
            let op = self.peek();
            if !matches!(op, b'+' | b'-') {
                return Ok(val);
            }
            self.next();
            let val2 = self.logic()?;
            val = if op == b'+' {
                val.wrapping_add(val2)
            } else {
                val.wrapping_sub(val2)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::testing::TestVm;
    use std::sync::Arc;

    struct Fake {
        vm: Arc<TestVm>,
        state: RunState,
        info: Option<MigrationInfo>,
        defaults: Mutex<DumpDefaults>,
    }

    impl Target for Fake {
        fn run_state(&self) -> RunState {
            self.state
        }
        fn guest_ram(&self) -> GuestRam {
            GuestRam::new(self.vm.clone())
        }
        fn migration_info(&self) -> Option<MigrationInfo> {
            self.info.clone()
        }
        fn dump_defaults(&self) -> &Mutex<DumpDefaults> {
            &self.defaults
        }
    }

    fn fake() -> Fake {
        let vm = TestVm::new(64 << 10);
        let bytes: Vec<u8> = (0..=255u8).cycle().take(64 << 10).collect();
        assert!(vm.mem.write_volatile(0, &bytes));
        Fake {
            vm,
            state: RunState::Running,
            info: None,
            defaults: Mutex::default(),
        }
    }

    #[test]
    fn dump_layouts() {
        let t = fake();
        let cases: &[(&str, &str)] = &[
            ("xp /0gx 0", ""),
            (
                "xp /2gx 0x1000",
                "0000000000001000: 0x0706050403020100 0x0f0e0d0c0b0a0908\r\n",
            ),
            (
                "xp /3wx 16",
                "0000000000000010: 0x13121110 0x17161514 0x1b1a1918\r\n",
            ),
            (
                "xp /10bx 0xf8",
                "00000000000000f8: 0xf8 0xf9 0xfa 0xfb 0xfc 0xfd 0xfe 0xff\r\n\
                 0000000000000100: 0x00 0x01\r\n",
            ),
            (
                "xp /4hd 0xfc",
                "00000000000000fc: 65020 65534   256   770\r\n",
            ),
            ("xp /1gd 0xf8", "00000000000000f8:     -283686952306184\r\n"),
            ("xp /3bo 0", "0000000000000000:   0  01  02\r\n"),
            ("xp /2bu 0xfe", "00000000000000fe: 254 255\r\n"),
            ("xp /2wo 0", "0000000000000000:  0300400400  0701402404\r\n"),
            ("xp /4bc 0x26", "0000000000000026: '&' '\\'' '(' ')'\r\n"),
        ];
        for (cmd, want) in cases {
            assert_eq!(execute(&t, cmd), *want, "{cmd}");
        }
        // The last format and size given are the defaults (here `/4bc`'s).
        assert_eq!(execute(&t, "xp 0x41"), "0000000000000041: 'A'\r\n");
        assert_eq!(execute(&t, "xp /x 0x41"), "0000000000000041: 0x41\r\n");
        assert_eq!(
            execute(&t, "xp /2 (0x40 + 2*4) | 1"),
            "0000000000000049: 0x49 0x4a\r\n"
        );
    }

    #[test]
    fn dump_errors() {
        let t = fake();
        // The line that leaves RAM says so and ends the dump.
        assert_eq!(
            execute(&t, "xp /3gx 0xfff0"),
            "000000000000fff0: 0xf7f6f5f4f3f2f1f0 0xfffefdfcfbfaf9f8\r\n\
             0000000000010000: Cannot access memory\r\n"
        );
        assert_eq!(
            execute(&t, "xp /gx -8"),
            "fffffffffffffff8: Cannot access memory\r\n"
        );
        for (cmd, first) in [
            ("xp", "unexpected end of expression"),
            ("xp /2gx", "unexpected end of expression"),
            ("xp /2q 0", "invalid char in format: 'q'"),
            ("xp /x 0 1", "xp: extraneous characters at the end of line"),
            ("xp /x $eax", "unknown register"),
            ("xp /x 0x10 / 0", "division by zero"),
            ("xp /x (1", "')' expected"),
            ("xp /x 99999999999999999999", "number too large"),
            ("xp /x #", "invalid char '#' in expression"),
        ] {
            assert_eq!(
                execute(&t, cmd),
                format!("{first}\r\nTry \"help xp\" for more information\r\n"),
                "{cmd}"
            );
        }
        let r = execute(&t, "xp /100000gx 0");
        assert!(r.starts_with("xp: count 100000 is too large"), "{r}");
        assert!(r.len() < 200);
        // Every count the bound allows fits the bound, in every format and size.
        for f in ["x", "d", "u", "o", "c"] {
            for s in ["b", "h", "w", "g"] {
                let r = execute(&t, &format!("xp /1000000{f}{s} 0"));
                let max: u64 = r
                    .split("at most ")
                    .nth(1)
                    .and_then(|x| x.split(' ').next())
                    .and_then(|x| x.parse().ok())
                    .unwrap_or_else(|| panic!("{r}"));
                // Values of all ones are the widest in every format but `c`.
                let vm = TestVm::filled(1 << 20, 0xff);
                let big = Fake {
                    vm,
                    state: RunState::Running,
                    info: None,
                    defaults: Mutex::default(),
                };
                let out = execute(&big, &format!("xp /{max}{f}{s} 0"));
                assert!(!out.contains("Cannot"), "{f}{s}");
                assert!(out.len() <= MAX_DUMP_OUTPUT_BYTES, "{f}{s}: {}", out.len());
                assert!(
                    out.len() > MAX_DUMP_OUTPUT_BYTES / 2,
                    "{f}{s}: {}",
                    out.len()
                );
            }
        }
    }

    #[test]
    fn status_and_unknown() {
        let mut t = fake();
        for (state, want) in [
            (RunState::Running, "VM status: running\r\n"),
            (RunState::Paused, "VM status: paused\r\n"),
            (RunState::Postmigrate, "VM status: paused (postmigrate)\r\n"),
            (RunState::Inmigrate, "VM status: paused (inmigrate)\r\n"),
            (
                RunState::FinishMigrate,
                "VM status: paused (finish-migrate)\r\n",
            ),
            (RunState::Shutdown, "VM status: paused (shutdown)\r\n"),
        ] {
            t.state = state;
            assert_eq!(execute(&t, "info status"), want);
            assert_eq!(execute(&t, "  i   status  "), want);
        }
        assert_eq!(execute(&t, "foo bar"), "unknown command: 'foo'\r\n");
        assert_eq!(execute(&t, "info foo"), "unknown command: 'info foo'\r\n");
        assert_eq!(execute(&t, " i foo"), "unknown command: ' i foo'\r\n");
        assert_eq!(
            execute(&t, " xp /q"),
            "invalid char in format: 'q'\r\nTry \"help  xp\" for more information\r\n"
        );
        assert_eq!(
            execute(&t, "info status now"),
            "status: extraneous characters at the end of line\r\n\
             Try \"help info status\" for more information\r\n"
        );
        assert_eq!(execute(&t, "   "), "");
        assert!(execute(&t, "info").contains("info status  -- "));
        assert_eq!(execute(&t, "info migrate"), "");
    }

    #[test]
    fn info_migrate_labels() {
        let mut t = fake();
        let mut info = MigrationInfo {
            status: MigrationStatus::Failed,
            error_desc: Some("peer went away".into()),
            total_time: Some(1234),
            setup_time: Some(5),
            ..Default::default()
        };
        let ram = stats::MigrationStats {
            transferred: 10 << 20,
            total: 256 << 20,
            page_size: 4096,
            mbps: 812.5,
            dirty_pages_rate: 42,
            ..Default::default()
        };
        info.ram = Some(ram);
        t.info = Some(info);
        let out = execute(&t, "info migrate");
        let lines: Vec<&str> = out.split("\r\n").collect();
        assert_eq!(lines[0], "Migration status: failed (peer went away)");
        for want in [
            "total time: 1234 ms",
            "setup: 5 ms",
            "transferred ram: 10240 kbytes",
            "throughput: 812.50 mbps",
            "total ram: 262144 kbytes",
            "page size: 4 kbytes",
            "dirty pages rate: 42 pages",
        ] {
            assert!(lines.contains(&want), "{want}: {out}");
        }
        assert!(!out.contains("downtime"), "{out}");
    }
}
