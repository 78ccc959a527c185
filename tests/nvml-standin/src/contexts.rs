//! Compute contexts: which processes "hold" a simulated GPU (from its `contexts` file).

/// What a `contexts` line was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextLine {
    Open(u32),
    Close(u32),
    Blank,
    Garbage,
}

/// Parses one line of a `contexts` file: `<pid>` or `-<pid>` (pid > 0).
pub fn parse_context_line(line: &str) -> ContextLine {
    let line = line.trim();
    if line.is_empty() {
        return ContextLine::Blank;
    }
    let (close, digits) = match line.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return ContextLine::Garbage;
    }
    match digits.parse::<u32>() {
        Ok(0) | Err(_) => ContextLine::Garbage,
        Ok(pid) if close => ContextLine::Close(pid),
        Ok(pid) => ContextLine::Open(pid),
    }
}

/// The processes holding a context, in the order they opened it.
#[derive(Debug, Default)]
pub struct Contexts {
    pids: Vec<u32>,
    /// Lines that were not `<pid>` or `-<pid>`.
    pub garbage: u64,
}

impl Contexts {
    /// Takes one line of the `contexts` file.
    pub fn apply_line(&mut self, line: &str) {
        match parse_context_line(line) {
            ContextLine::Open(pid) => {
                if !self.pids.contains(&pid) {
                    self.pids.push(pid);
                }
            }
            ContextLine::Close(pid) => self.pids.retain(|&p| p != pid),
            ContextLine::Blank => {}
            ContextLine::Garbage => self.garbage += 1,
        }
    }

    /// Forgets every context (the file was truncated or replaced and is re-read).
    pub fn clear(&mut self) {
        self.pids.clear();
    }

    /// Drops, for good, the processes for which `alive` is false; returns the rest.
    pub fn live(&mut self, alive: impl Fn(u32) -> bool) -> &[u32] {
        self.pids.retain(|&p| alive(p));
        &self.pids
    }
}

/// Whether process `pid` exists, zombie or not (until its parent reaps it).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` exists and is not a zombie (from `/proc/<pid>/stat`).
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "<pid> (<comm>) <state> ...": comm may contain spaces and parentheses.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X") | Some("x"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_context_lines() {
        assert_eq!(parse_context_line("123"), ContextLine::Open(123));
        assert_eq!(parse_context_line(" -123 "), ContextLine::Close(123));
        assert_eq!(parse_context_line(""), ContextLine::Blank);
        for bad in ["0", "-0", "+5", "12a", "--5", "- 5", "99999999999", "x"] {
            assert_eq!(parse_context_line(bad), ContextLine::Garbage, "{bad:?}");
        }
    }

    #[test]
    fn add_remove_and_dead_processes() {
        let mut c = Contexts::default();
        for line in ["10", "20", "10", "30", "-20", "junk", "-99", "40"] {
            c.apply_line(line);
        }
        assert_eq!(c.garbage, 1);
        assert_eq!(c.live(|_| true), &[10, 30, 40]);
        assert_eq!(c.live(|p| p != 30), &[10, 40]);
        // A dead process stays gone even if it would look alive again (pid reuse).
        assert_eq!(c.live(|_| true), &[10, 40]);
        c.apply_line("30");
        assert_eq!(c.live(|_| true), &[10, 40, 30]);
        c.clear();
        assert!(c.live(|_| true).is_empty());
    }

    #[test]
    fn liveness_from_proc() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not yet reaped: a zombie once it exits, which counts as gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "child {pid} never exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(!process_alive(pid));
        assert!(!process_alive(u32::MAX));
    }
}
