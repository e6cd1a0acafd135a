//! `qmig send`: migrate RAM images (an `extract`/`recv` output) to a QEMU
//! destination, in a container copied from a template stream.
//!
//! The stream: the template's header and configuration, the `ram` START
//! section (MEM_SIZE), PART sections of at most one rate-limit period's
//! bytes each, [SWITCHOVER_START], the `ram` END section (the final pass),
//! then the template's device sections, EOF and vmdesc, byte for byte.
//!
//! With `--passes N` (N > 1), a deterministic workload (seeded PRNG) changes
//! a fraction of the first block's pages before passes 2..=N and reports
//! them dirty; pass N is the completion stage. `--final-ram DIR` writes the
//! memory as the destination must end with it (manifest + images).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use qmig_ram_src::{Config, Progress, RamSrc, SrcBlock, Template, DEFAULT_XBZRLE_CACHE_SIZE};
use qmig_wire::{Item, SectionKind};
use serde_json::{json, Value};

/// Options of `qmig send`.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Directory with manifest.json and block images.
    #[arg(long, value_name = "DIR")]
    pub ram: PathBuf,
    /// Stream whose header, configuration, device sections and vmdesc are reused.
    #[arg(long, value_name = "STREAM")]
    pub template: PathBuf,
    /// Destination: tcp:HOST:PORT, file:PATH or exec:CMD.
    #[arg(long, value_name = "URI")]
    pub to: String,
    /// Use XBZRLE after the first pass.
    #[arg(long)]
    pub xbzrle: bool,
    /// XBZRLE cache size in bytes (default 64 MiB).
    #[arg(long, value_name = "BYTES", requires = "xbzrle")]
    pub cache_size: Option<u64>,
    /// Send COMPRESS_PAGE records at this zlib level (for QEMU <= 9.0 destinations).
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(u32).range(0..=9))]
    pub compress: Option<u32>,
    /// Number of passes; before passes 2..=N a workload changes pages (N is the final pass).
    #[arg(long, default_value_t = 1)]
    pub passes: u32,
    /// Fraction of the first block's pages changed before each later pass.
    #[arg(long, default_value_t = 0.05)]
    pub dirty_fraction: f64,
    /// Workload PRNG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rate limit in bytes per second (QEMU's max-bandwidth; 0 = unlimited).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub max_bandwidth: Option<u64>,
    /// Send zero pages as PAGE (QEMU's zero-page-detection=none).
    #[arg(long)]
    pub no_zero_detection: bool,
    /// Write the memory the destination must end with (manifest + images) here.
    #[arg(long, value_name = "DIR")]
    pub final_ram: Option<PathBuf>,
    /// Print the counters as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Give up when a tcp: destination accepts no data, or does not close
    /// the connection after the stream, for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
}

type Error = Box<dyn std::error::Error>;

/// Where the stream goes.
enum Sink {
    Tcp(TcpStream),
    File(File),
    Exec(Child, Option<ChildStdin>),
}

impl Sink {
    fn open(uri: &str, idle: Duration) -> Result<Sink, Error> {
        if let Some(addr) = uri.strip_prefix("tcp:") {
            let mut last = None;
            // The destination may still be starting: retry for a few seconds.
            for _ in 0..50 {
                match TcpStream::connect(addr) {
                    Ok(s) => {
                        s.set_nodelay(true).ok();
                        // A destination that stops reading cannot stall us forever.
                        s.set_write_timeout(Some(idle))?;
                        s.set_read_timeout(Some(idle))?;
                        return Ok(Sink::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let e = last.map_or_else(|| "no address".to_string(), |e| e.to_string());
            Err(format!("cannot connect to {addr}: {e}").into())
        } else if let Some(path) = uri.strip_prefix("file:") {
            Ok(Sink::File(
                File::create(path).map_err(|e| format!("cannot create {path}: {e}"))?,
            ))
        } else if let Some(cmd) = uri.strip_prefix("exec:") {
            let mut child = Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
            let stdin = child.stdin.take();
            Ok(Sink::Exec(child, stdin))
        } else {
            Err(
                format!("unknown URI {uri:?}: expected tcp:HOST:PORT, file:PATH or exec:CMD")
                    .into(),
            )
        }
    }

    fn write_all(&mut self, buf: &[u8], sent: u64) -> Result<(), Error> {
        let r = match self {
            Sink::Tcp(s) => s.write_all(buf),
            Sink::File(f) => f.write_all(buf),
            Sink::Exec(_, Some(i)) => i.write_all(buf),
            Sink::Exec(_, None) => Ok(()),
        };
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                format!("the destination closed the connection after {sent} bytes (it refused the stream?): {e}").into()
            }
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "the destination accepted no data for the idle timeout (--idle-timeout) after {sent} bytes"
            )
            .into(),
            _ => format!("write failed after {sent} bytes: {e}").into(),
        })
    }

    /// Ends the stream and waits for the destination to let go.
    fn finish(self) -> Result<(), Error> {
        match self {
            Sink::Tcp(mut s) => {
                s.flush()?;
                s.shutdown(std::net::Shutdown::Write).ok();
                // QEMU closes its end once it has loaded the stream (the read
                // timeout is --idle-timeout, set at connect).
                let mut buf = [0u8; 256];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            return Err(
                                "the destination reset the connection at the end of the stream"
                                    .into(),
                            )
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            return Err("the destination did not close the connection within the idle timeout (--idle-timeout) after the stream".into())
                        }
                        Err(e) => {
                            return Err(format!("waiting for the destination to close: {e}").into())
                        }
                    }
                }
            }
            Sink::File(mut f) => {
                // Like QEMU's file: migration, no fsync: the data is in the
                // page cache when the command returns.
                f.flush()?;
                Ok(())
            }
            Sink::Exec(mut c, stdin) => {
                drop(stdin);
                let st = c.wait()?;
                if st.success() {
                    Ok(())
                } else {
                    Err(format!("exec command failed: {st}").into())
                }
            }
        }
    }
}

/// The RAM to send: the manifest's blocks and their images.
struct Ram {
    names: Vec<String>,
    files: Vec<String>,
    images: Vec<Vec<u8>>,
}

fn load_ram(dir: &Path) -> Result<Ram, Error> {
    let mpath = dir.join("manifest.json");
    let m: Value =
        serde_json::from_slice(&fs::read(&mpath).map_err(|e| format!("{}: {e}", mpath.display()))?)
            .map_err(|e| format!("{}: {e}", mpath.display()))?;
    let blocks = m["blocks"]
        .as_array()
        .ok_or_else(|| format!("{}: no \"blocks\" array", mpath.display()))?;
    let mut ram = Ram {
        names: Vec::new(),
        files: Vec::new(),
        images: Vec::new(),
    };
    for b in blocks {
        let (Some(name), Some(file), Some(len)) =
            (b["name"].as_str(), b["file"].as_str(), b["length"].as_u64())
        else {
            return Err(
                format!("{}: block entry without name/file/length", mpath.display()).into(),
            );
        };
        if file.contains('/') || file.starts_with('.') {
            return Err(format!("{}: suspicious file name {file:?}", mpath.display()).into());
        }
        let mut img = fs::read(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
        if img.len() as u64 > len {
            return Err(format!("{file}: {} bytes, manifest says {len}", img.len()).into());
        }
        img.resize(len as usize, 0);
        ram.names.push(name.to_string());
        ram.files.push(file.to_string());
        ram.images.push(img);
    }
    Ok(ram)
}

/// splitmix64: a small deterministic PRNG for the workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Changes about `fraction` of the first block's pages: mostly a few bytes
/// (XBZRLE material), sometimes the whole page, sometimes zeroes it, and
/// reports them dirty. Only the upper half of the block is touched (low
/// memory holds firmware and option-ROM state that devices check when they
/// load), and three quarters of the writes go to a hot window of
/// `fraction` of the block, so later passes rewrite the same pages, as guests do.
fn workload(
    rng: &mut Rng,
    ram: &mut Ram,
    src: &mut RamSrc,
    fraction: f64,
    page_size: usize,
) -> Result<u64, Error> {
    let Some(img) = ram.images.first_mut() else {
        return Ok(0);
    };
    let pages = (img.len() / page_size) as u64;
    let base = pages / 2;
    let span = pages - base;
    let n = ((pages as f64) * fraction.clamp(0.0, 1.0)).round() as u64;
    let hot = n.clamp(1, span.max(1));
    for _ in 0..n {
        let p = if rng.below(4) < 3 {
            base + rng.below(hot)
        } else {
            base + rng.below(span)
        };
        let page = &mut img[(p as usize) * page_size..(p as usize + 1) * page_size];
        match rng.below(20) {
            0..=13 => {
                for _ in 0..=rng.below(16) {
                    let at = rng.below(page_size as u64) as usize;
                    page[at] = rng.next() as u8;
                }
            }
            14..=16 => page.iter_mut().for_each(|b| *b = rng.next() as u8),
            _ => page.fill(0),
        }
        src.handle_dirty_page(0, p)?;
    }
    Ok(n)
}

/// Writes `buf` and paces to `bw` bytes per second.
struct Pacer {
    start: Instant,
    sent: u64,
    bw: Option<u64>,
}

impl Pacer {
    fn send(&mut self, sink: &mut Sink, buf: &mut Vec<u8>) -> Result<(), Error> {
        sink.write_all(buf, self.sent)?;
        self.sent += buf.len() as u64;
        buf.clear();
        if let Some(bw) = self.bw {
            let due = Duration::from_secs_f64(self.sent as f64 / bw as f64);
            let el = self.start.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
        Ok(())
    }
}

/// Reads the template stream item by item (gzip'd or not) and keeps
/// everything but its page records: a valid stream with the same container,
/// MEM_SIZE list and device state, a few hundred KiB however large the
/// template's RAM.
fn template_skeleton(path: &Path) -> Result<Vec<u8>, Error> {
    let (mut rd, _) = crate::input::open_stream(path)?;
    let mut out = Vec::new();
    while let Some(ri) = rd
        .next_item()
        .map_err(|e| format!("{}: {e}", path.display()))?
    {
        match &ri.item {
            Item::Ram(r) if r.is_page() => {}
            it => it.write(&mut out)?,
        }
    }
    Ok(out)
}

/// Runs `qmig send`.
pub fn run(a: &SendArgs) -> Result<ExitCode, Error> {
    let tpl_bytes = template_skeleton(&a.template)?;
    let t = Template::parse(&tpl_bytes)?;
    let mut ram = load_ram(&a.ram)?;
    let page_size = 1usize << t.page_bits;

    let mut blocks = SrcBlock::sequential(
        ram.names
            .iter()
            .zip(&ram.images)
            .map(|(n, i)| (n.as_str(), i.len() as u64)),
    );
    let ignore_shared = t.has_capability("x-ignore-shared");
    if t.has_capability("mapped-ram") {
        return Err("template uses mapped-ram: not supported".into());
    }
    for b in &mut blocks {
        let tb = t.mem_block(&b.name);
        match tb {
            Some(tb) if tb.used_length != b.used_length => eprintln!(
                "qmig: warning: block {} is {:#x} bytes, the template's is {:#x}",
                b.name, b.used_length, tb.used_length
            ),
            None => eprintln!("qmig: warning: block {} is not in the template", b.name),
            _ => {}
        }
        b.mem_size_page_size = tb.and_then(|tb| tb.page_size);
        b.mem_size_addr = tb.and_then(|tb| tb.addr);
        if ignore_shared && b.mem_size_addr.is_none() {
            return Err(format!(
                "template has x-ignore-shared but no guest address for block {}",
                b.name
            )
            .into());
        }
        b.host_page_size = page_size as u64;
    }
    let config = Config {
        page_size,
        xbzrle_cache_size: a
            .xbzrle
            .then_some(a.cache_size.unwrap_or(DEFAULT_XBZRLE_CACHE_SIZE)),
        compress_level: a.compress,
        zero_page_detection: !a.no_zero_detection,
    };
    let mut src = RamSrc::new(blocks, config)?;
    let total: u64 = ram.images.iter().map(|i| i.len() as u64).sum();

    let mut sink = Sink::open(&a.to, Duration::from_secs(a.idle_timeout))?;
    let bw = a.max_bandwidth.filter(|&b| b > 0);
    // QEMU's rate limit: max-bandwidth per 100 ms period (default 128 MiB/s).
    let budget = bw.map_or(16 << 20, |b| (b / 10).max(1) as usize);
    let mut pacer = Pacer {
        start: Instant::now(),
        sent: 0,
        bw,
    };
    let mut out = Vec::with_capacity(budget + (1 << 16));
    let mut rng = Rng(a.seed);
    let passes = a.passes.max(1);
    let verbose = !a.json;

    t.write_prefix(&mut out);
    t.begin_section(SectionKind::Start, &mut out)?;
    src.poll_setup(&mut out)?;
    t.end_section(&mut out);
    pacer.send(&mut sink, &mut out)?;

    let pb = crate::progress::bytes(total, "pass 1");
    for pass in 1..passes.max(2) {
        if pass > 1 {
            let n = workload(&mut rng, &mut ram, &mut src, a.dirty_fraction, page_size)?;
            let d = src.handle_sync()?;
            if verbose {
                eprintln!("qmig: pass {pass}: workload changed {n} pages, {d} dirty");
            }
        }
        loop {
            t.begin_section(SectionKind::Part, &mut out)?;
            let p = src.poll_iterate(&ram.images, budget, &mut out)?;
            t.end_section(&mut out);
            pb.set_position(src.counters().transferred.min(total));
            pacer.send(&mut sink, &mut out)?;
            if p == Progress::Clean {
                break;
            }
        }
    }
    pb.finish_and_clear();
    if passes > 1 {
        let n = workload(&mut rng, &mut ram, &mut src, a.dirty_fraction, page_size)?;
        if verbose {
            eprintln!("qmig: pass {passes} (completion): workload changed {n} pages");
        }
    }
    t.write_switchover(&mut out)?;
    t.begin_section(SectionKind::End, &mut out)?;
    src.poll_complete(&ram.images, &mut out)?;
    t.end_section(&mut out);
    t.write_tail(&mut out);
    pacer.send(&mut sink, &mut out)?;
    let elapsed = pacer.start.elapsed();
    sink.finish()?;

    if let Some(dir) = &a.final_ram {
        fs::create_dir_all(dir)?;
        let mut blocks = Vec::new();
        for ((n, f), img) in ram.names.iter().zip(&ram.files).zip(&ram.images) {
            fs::write(dir.join(f), img)?;
            blocks.push(json!({"name": n, "file": f, "length": img.len()}));
        }
        fs::write(
            dir.join("manifest.json"),
            serde_json::to_vec_pretty(&json!({"blocks": blocks, "complete": true}))?,
        )?;
    }

    let c = src.counters();
    let summary = json!({
        "bytes": pacer.sent,
        "seconds": elapsed.as_secs_f64(),
        "passes": passes,
        "dirty_sync_count": c.dirty_sync_count,
        "normal": c.normal,
        "duplicate": c.duplicate,
        "xbzrle": {"pages": c.xbzrle_pages, "bytes": c.xbzrle_bytes,
                   "cache_miss": c.xbzrle_cache_miss, "overflow": c.xbzrle_overflow,
                   "unchanged": c.xbzrle_unchanged},
        "compressed": {"pages": c.compressed_pages, "bytes": c.compressed_bytes},
    });
    if a.json {
        println!("{summary}");
    } else {
        eprintln!(
            "qmig: sent {} bytes in {:.3}s: {} normal, {} zero, {} xbzrle ({} cache misses, {} overflows), {} compressed, {} syncs",
            pacer.sent,
            elapsed.as_secs_f64(),
            c.normal,
            c.duplicate,
            c.xbzrle_pages,
            c.xbzrle_cache_miss,
            c.xbzrle_overflow,
            c.compressed_pages,
            c.dirty_sync_count
        );
    }
    Ok(ExitCode::SUCCESS)
}
