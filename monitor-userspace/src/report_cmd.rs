//! `stallmon report FILE`: recompute the GPU attribution from a record file through the same
//! attribution code as live tracing, and print the same summary.
use std::{collections::BTreeMap, fs::File, io::BufReader, path::Path};

use anyhow::{Context, Result, bail};

use crate::{
    attribution::AttributorConfig, pipeline::attach_gpu_results, report, summary::Summary,
};

pub fn run(path: &Path, json: bool) -> Result<i32> {
    let open = || -> Result<BufReader<File>> {
        Ok(BufReader::new(File::open(path).with_context(|| {
            format!("cannot open record file {}", path.display())
        })?))
    };
    let recomputed = report::recompute_reader(open()?, AttributorConfig::default())?;
    let mut summary: Option<Summary> = None;
    let mut header: Option<serde_json::Value> = None;
    for line in report::json_lines(open()?) {
        let (_, v) = line?;
        match v.get("type").and_then(|t| t.as_str()) {
            Some("summary") => {
                summary =
                    Some(serde_json::from_value(v["summary"].clone()).context("bad summary line")?)
            }
            Some("header") => header = Some(v),
            _ => {}
        }
    }
    let Some(header) = header else {
        bail!(
            "{} is not a stallmon record file (no header line)",
            path.display()
        );
    };
    let mut summary = summary.unwrap_or_else(|| {
        // The tracer was killed before writing its summary: GPU figures only.
        let mut s = Summary::from_snapshot(
            &Default::default(),
            0.0,
            header["target_pid"].as_u64().unwrap_or(0) as u32,
            header["job_name"].as_str().unwrap_or(""),
        );
        s.gpu_disabled = None;
        s
    });
    let source = header["gpu_source"].as_str().map(str::to_string);
    if source.is_some() {
        let labels: BTreeMap<u32, (String, String)> = recomputed
            .gpus
            .iter()
            .map(|(i, l)| (*i, (l.uuid.clone(), l.model.clone())))
            .collect();
        attach_gpu_results(
            &mut summary,
            &recomputed.totals,
            &labels,
            source.as_deref(),
            &BTreeMap::new(),
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.human());
    }
    Ok(0)
}
