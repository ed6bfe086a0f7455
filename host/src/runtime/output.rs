//! What a plugin says during a call: `host.log` lines and captured stdout/stderr.
//!
//! Owns the per-call output budget (one cap shared by all three sources, with
//! a cost per line and a cap on lines), the tagging of every line with the
//! plugin and event, and the WASI stdio streams that feed it. Lines go to the
//! host log as they arrive, control characters escaped, and are kept, within
//! the budget, in the call's outcome.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;

use super::secrets::Secrets;
use crate::text::escape_controls;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// What each kept line costs against the output budget on top of its bytes:
/// about what the host spends on it (a `LogLine`, a log record's fields), so
/// empty lines are not free. A 64 KiB budget holds at most 1,024 lines.
pub const LINE_OVERHEAD_BYTES: usize = 64;

/// The most lines one call keeps and logs, whatever its budget: lines past it
/// are counted, not formatted, kept or logged.
pub const MAX_LINES_PER_CALL: usize = 1_000;

/// Severity of a plugin's line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Where a plugin's line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogSource {
    /// The `host.log` import.
    Log,
    Stdout,
    Stderr,
}

/// One line a plugin wrote during a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub source: LogSource,
    pub message: String,
}

/// `info: text` for a `host.log` line, `stdout: text` for a printed one.
impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = match (self.source, self.level) {
            (LogSource::Stdout, _) => "stdout",
            (LogSource::Stderr, _) => "stderr",
            (LogSource::Log, LogLevel::Trace) => "trace",
            (LogSource::Log, LogLevel::Debug) => "debug",
            (LogSource::Log, LogLevel::Info) => "info",
            (LogSource::Log, LogLevel::Warn) => "warn",
            (LogSource::Log, LogLevel::Error) => "error",
        };
        write!(f, "{from}: {}", self.message)
    }
}

/// Who is speaking: put on every host log line a plugin causes.
#[derive(Debug, Clone)]
pub(crate) struct CallTag {
    pub plugin: Arc<str>,
    pub event: Arc<str>,
    /// A dry run (a candidate tried, not acting): its lines and refusals
    /// stay in its outcome, out of the host log, where they would pass for
    /// the live plugin's.
    pub dry: bool,
}

impl CallTag {
    /// The delivery's identity, `EVENT_KEY:PLUGIN`: the same on every attempt
    /// (WIT `host.delivery-key`, and the `Idempotency-Key` of outbound calls).
    pub(crate) fn delivery_key(&self) -> String {
        format!("{}:{}", self.event, self.plugin)
    }
}

/// The output of one call, shared by the `host.log` import and both stdio streams.
#[derive(Debug)]
pub(crate) struct Output {
    tag: CallTag,
    budget: usize,
    /// Scrubbed from every line before it is cut, kept or logged.
    secrets: Secrets,
    lines: Vec<LogLine>,
    dropped_bytes: usize,
    dropped_lines: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Output {
    pub(crate) fn new(tag: CallTag, budget: usize, secrets: Secrets) -> Self {
        Self {
            tag,
            budget,
            secrets,
            lines: Vec::new(),
            dropped_bytes: 0,
            dropped_lines: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Record a line (cut to the budget left), or count it as dropped once
    /// the budget or the line cap is spent.
    pub(crate) fn line(&mut self, level: LogLevel, source: LogSource, message: &str) {
        let message = self.secrets.scrub(message);
        let message = message.as_ref();
        let room = (self.lines.len() < MAX_LINES_PER_CALL)
            .then(|| self.budget.checked_sub(LINE_OVERHEAD_BYTES))
            .flatten();
        let keep = room.map_or(0, |room| floor_char_boundary(message, room));
        if room.is_none() || (keep == 0 && !message.is_empty()) {
            self.dropped_lines += 1;
            self.dropped_bytes += message.len();
            return;
        }
        self.dropped_bytes += message.len() - keep;
        self.budget -= keep + LINE_OVERHEAD_BYTES;
        let message = &message[..keep];
        emit(&self.tag, level, source, message);
        self.lines.push(LogLine {
            level,
            source,
            message: message.to_owned(),
        });
    }

    fn stdio(&mut self, source: LogSource, bytes: &[u8]) {
        let pending = match source {
            LogSource::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        };
        // Never hold more than the budget in a partial line.
        let room = self.budget.saturating_sub(pending.len());
        let take = bytes.len().min(room);
        pending.extend_from_slice(&bytes[..take]);
        self.dropped_bytes += bytes.len() - take;
        let Some(last_newline) = pending.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = pending.drain(..=last_newline).collect();
        for line in complete[..last_newline].split(|&b| b == b'\n') {
            self.stdio_line(source, line);
        }
    }

    fn stdio_line(&mut self, source: LogSource, line: &[u8]) {
        let level = match source {
            LogSource::Stderr => LogLevel::Warn,
            _ => LogLevel::Info,
        };
        self.line(level, source, &String::from_utf8_lossy(line));
    }

    /// End the call: flush partial stdio lines, say what was cut, return the lines.
    pub(crate) fn finish(&mut self) -> Vec<LogLine> {
        for source in [LogSource::Stdout, LogSource::Stderr] {
            let pending = std::mem::take(match source {
                LogSource::Stderr => &mut self.stderr,
                _ => &mut self.stdout,
            });
            if !pending.is_empty() {
                self.stdio_line(source, &pending);
            }
        }
        // A dry run's cuts are in its outcome; logged, they would pass for
        // the live plugin's.
        if (self.dropped_bytes > 0 || self.dropped_lines > 0) && !self.tag.dry {
            tracing::warn!(
                plugin = %self.tag.plugin,
                event = %self.tag.event,
                dropped_bytes = self.dropped_bytes,
                dropped_lines = self.dropped_lines,
                "plugin output truncated: per-call output or line limit reached"
            );
        }
        std::mem::take(&mut self.lines)
    }

    pub(crate) fn dropped_bytes(&self) -> usize {
        self.dropped_bytes
    }

    pub(crate) fn dropped_lines(&self) -> usize {
        self.dropped_lines
    }
}

fn emit(tag: &CallTag, level: LogLevel, source: LogSource, message: &str) {
    if tag.dry {
        return;
    }
    let (plugin, event) = (&*tag.plugin, &*tag.event);
    let stream = match source {
        LogSource::Log => "log",
        LogSource::Stdout => "stdout",
        LogSource::Stderr => "stderr",
    };
    let message = escape_controls(message);
    match level {
        LogLevel::Trace => tracing::trace!(target: "plugin", plugin, event, stream, "{message}"),
        LogLevel::Debug => tracing::debug!(target: "plugin", plugin, event, stream, "{message}"),
        LogLevel::Info => tracing::info!(target: "plugin", plugin, event, stream, "{message}"),
        LogLevel::Warn => tracing::warn!(target: "plugin", plugin, event, stream, "{message}"),
        LogLevel::Error => tracing::error!(target: "plugin", plugin, event, stream, "{message}"),
    }
}

/// The largest index `<= max` that is a char boundary of `s`.
pub(crate) fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// A plugin's stdout or stderr: writes land in the call's [`Output`].
#[derive(Debug, Clone)]
pub(crate) struct Capture {
    output: Arc<Mutex<Output>>,
    source: LogSource,
}

impl Capture {
    pub(crate) fn new(output: Arc<Mutex<Output>>, source: LogSource) -> Self {
        Self { output, source }
    }

    fn write_bytes(&self, bytes: &[u8]) {
        self.output
            .lock()
            .expect("output lock is never poisoned: no panics while held")
            .stdio(self.source, bytes);
    }
}

/// What a plugin may write in one go; the stream always has room because
/// anything past the budget is counted and dropped, never blocked on.
const STDIO_WRITE_CHUNK: usize = 64 << 10;

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(STDIO_WRITE_CHUNK)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(budget: usize) -> Output {
        let tag = CallTag {
            plugin: "p".into(),
            event: "e".into(),
            dry: false,
        };
        Output::new(tag, budget, Secrets::default())
    }

    #[test]
    fn stdio_is_split_into_lines_and_flushed_at_the_end() {
        let mut out = output(1024);
        out.stdio(LogSource::Stdout, b"one\ntw");
        out.stdio(LogSource::Stdout, b"o\nthree");
        out.stdio(LogSource::Stderr, b"oops\n");
        let lines: Vec<_> = out
            .finish()
            .into_iter()
            .map(|l| (l.source, l.message))
            .collect();
        assert_eq!(
            lines,
            [
                (LogSource::Stdout, "one".to_owned()),
                (LogSource::Stdout, "two".to_owned()),
                (LogSource::Stderr, "oops".to_owned()),
                (LogSource::Stdout, "three".to_owned()),
            ]
        );
    }

    #[test]
    fn budget_is_shared_and_the_rest_is_counted() {
        let mut out = output(2 * LINE_OVERHEAD_BYTES + 10);
        out.line(LogLevel::Info, LogSource::Log, "123456");
        out.line(LogLevel::Info, LogSource::Log, "abcdef");
        out.stdio(LogSource::Stdout, b"more\n");
        let lines = out.finish();
        assert_eq!(lines[0].message, "123456");
        assert_eq!(lines[1].message, "abcd");
        assert_eq!(lines.len(), 2);
        // The stdio bytes found no room even for a partial line.
        assert_eq!(out.dropped_bytes(), 2 + 5);
        assert_eq!(out.dropped_lines(), 0);
    }

    #[test]
    fn empty_lines_cost_their_overhead_and_lines_are_capped() {
        let mut out = output(LINE_OVERHEAD_BYTES * 3);
        for _ in 0..10 {
            out.line(LogLevel::Info, LogSource::Log, "");
        }
        assert_eq!(out.finish().len(), 3);
        assert_eq!(out.dropped_lines(), 7);

        let mut out = output(usize::MAX);
        for _ in 0..MAX_LINES_PER_CALL + 5 {
            out.line(LogLevel::Info, LogSource::Log, "x");
        }
        assert_eq!(out.finish().len(), MAX_LINES_PER_CALL);
        assert_eq!(out.dropped_lines(), 5);
    }
}
