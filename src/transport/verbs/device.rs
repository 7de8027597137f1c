//! Choosing a device and port, its addressing (LID or GID, MTU), and the
//! connection settings, from the environment.

use std::ffi::CStr;

use super::library::Verbs;
use super::sys::*;
use crate::error::{Error, Result};

/// Connection settings (`AFMESH_IB_*`, see [`Settings::from_env`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Queue pairs per link (`AFMESH_QPS`, 1..=8).
    pub qps: usize,
    /// Local ACK timeout exponent: 4.096 µs × 2^timeout (`AFMESH_IB_TIMEOUT`).
    pub timeout: u8,
    /// Transport retries (`AFMESH_IB_RETRY_CNT`, 0..=7).
    pub retry_cnt: u8,
    /// RNR retries (`AFMESH_IB_RNR_RETRY`, 0..=7; 7 is forever).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer code (`AFMESH_IB_MIN_RNR_TIMER`, 0..=31).
    pub min_rnr_timer: u8,
    /// Service level (`AFMESH_IB_SL`).
    pub sl: u8,
    /// Traffic class of RoCE packets (`AFMESH_IB_TRAFFIC_CLASS`).
    pub traffic_class: u8,
    /// One signalled work request every this many (`AFMESH_IB_SIGNAL_EVERY`).
    pub signal_every: u32,
    /// Messages at least this long are striped (`AFMESH_IB_STRIPE_MIN`).
    pub stripe_min: u64,
    /// Inline bytes asked of each QP (`AFMESH_IB_INLINE`; the QP may grant
    /// less).
    pub inline: u32,
    /// Liveness probe period, ms (`AFMESH_IB_PROBE_MS`).
    pub probe_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            qps: 1,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            sl: 0,
            traffic_class: 0,
            signal_every: 16,
            stripe_min: 64 * 1024,
            inline: 220,
            probe_ms: 100,
        }
    }
}

impl Settings {
    /// The defaults with the environment's overrides; a bad value is an
    /// error naming the variable.
    pub fn from_env() -> Result<Settings> {
        Settings::from(|k| std::env::var(k).ok())
    }

    /// As [`Settings::from_env`], reading through `get`.
    pub fn from(get: impl Fn(&str) -> Option<String>) -> Result<Settings> {
        let mut s = Settings::default();
        let num = |k: &str, lo: u64, hi: u64| -> Result<Option<u64>> {
            let Some(v) = get(k) else { return Ok(None) };
            match v.trim().parse::<u64>() {
                Ok(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
                _ => Err(Error::config(format!(
                    "{k}={v:?}: expected a number in {lo}..={hi}"
                ))),
            }
        };
        if let Some(n) = num("AFMESH_QPS", 1, 8)? {
            s.qps = n as usize;
        }
        if let Some(n) = num("AFMESH_IB_TIMEOUT", 1, 31)? {
            s.timeout = n as u8;
        }
        if let Some(n) = num("AFMESH_IB_RETRY_CNT", 0, 7)? {
            s.retry_cnt = n as u8;
        }
        if let Some(n) = num("AFMESH_IB_RNR_RETRY", 0, 7)? {
            s.rnr_retry = n as u8;
        }
        if let Some(n) = num("AFMESH_IB_MIN_RNR_TIMER", 0, 31)? {
            s.min_rnr_timer = n as u8;
        }
        if let Some(n) = num("AFMESH_IB_SL", 0, 15)? {
            s.sl = n as u8;
        }
        if let Some(n) = num("AFMESH_IB_TRAFFIC_CLASS", 0, 255)? {
            s.traffic_class = n as u8;
        }
        if let Some(n) = num("AFMESH_IB_SIGNAL_EVERY", 1, 64)? {
            s.signal_every = n as u32;
        }
        if let Some(n) = num("AFMESH_IB_STRIPE_MIN", 1, u64::from(u32::MAX))? {
            s.stripe_min = n;
        }
        if let Some(n) = num("AFMESH_IB_INLINE", 0, 1024)? {
            s.inline = n as u32;
        }
        if let Some(n) = num("AFMESH_IB_PROBE_MS", 1, 60_000)? {
            s.probe_ms = n;
        }
        Ok(s)
    }
}

/// Which devices and ports to use: `AFMESH_IB_DEVICE` (`mlx5_0`,
/// `mlx5_0:1`, or a comma list: every device listed is a rail), else the
/// RDMA device behind StepMesh's `DMLC_INTERFACE` network interface, else
/// the first device with an active port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// `(device, port)` choices in order; empty: any.
    pub choices: Vec<(String, Option<u8>)>,
    /// Where the choice came from (for errors).
    pub source: String,
}

impl Wanted {
    /// From the environment.
    pub fn from_env() -> Result<Wanted> {
        Wanted::from(|k| std::env::var(k).ok(), interface_device)
    }

    /// As [`Wanted::from_env`], reading through `get`, mapping interfaces
    /// with `iface`.
    pub fn from(
        get: impl Fn(&str) -> Option<String>,
        iface: impl Fn(&str) -> Option<String>,
    ) -> Result<Wanted> {
        if let Some(v) = get("AFMESH_IB_DEVICE").filter(|v| !v.trim().is_empty()) {
            let mut choices = Vec::new();
            for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (name, port) = match part.split_once(':') {
                    Some((n, p)) => match p.parse::<u8>() {
                        Ok(p) if p >= 1 => (n, Some(p)),
                        _ => {
                            return Err(Error::config(format!(
                                "AFMESH_IB_DEVICE={v:?}: port {p:?} of {n} is not a number >= 1"
                            )))
                        }
                    },
                    None => (part, None),
                };
                choices.push((name.to_string(), port));
            }
            return Ok(Wanted {
                choices,
                source: format!("AFMESH_IB_DEVICE={v:?}"),
            });
        }
        if let Some(i) = get("DMLC_INTERFACE").filter(|v| !v.trim().is_empty() && v != "auto") {
            if let Some(dev) = iface(i.trim()) {
                return Ok(Wanted {
                    choices: vec![(dev, None)],
                    source: format!("DMLC_INTERFACE={i:?}"),
                });
            }
        }
        Ok(Wanted {
            choices: Vec::new(),
            source: "the first device with an active port".into(),
        })
    }
}

/// The RDMA device behind network interface `name`, from sysfs.
fn interface_device(name: &str) -> Option<String> {
    if name.contains('/') {
        return None;
    }
    let dir = format!("/sys/class/net/{name}/device/infiniband");
    let mut it = std::fs::read_dir(dir).ok()?;
    it.next()?
        .ok()
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// An open device at the chosen port, with its addressing.
#[derive(Debug)]
pub struct Device {
    pub ctx: *mut ibv_context,
    pub name: String,
    pub port: u8,
    pub attr: ibv_device_attr,
    pub port_attr: ibv_port_attr,
    /// GID index used (`None`: LID addressing on InfiniBand).
    pub gid_index: Option<u8>,
    pub gid: [u8; 16],
}

impl Device {
    /// Whether the port is Ethernet (RoCE).
    pub fn roce(&self) -> bool {
        u32::from(self.port_attr.link_layer) == IBV_LINK_LAYER_ETHERNET
    }

    /// `"rocev2"`/`"ib"` for logs.
    pub fn link_layer(&self) -> &'static str {
        if self.roce() {
            "RoCE"
        } else {
            "InfiniBand"
        }
    }

    /// The port's speed, Gb/s, from its active width and speed.
    pub fn port_gbps(&self) -> f64 {
        let lanes = match self.port_attr.active_width {
            1 => 1.0,
            2 => 4.0,
            4 => 8.0,
            8 => 12.0,
            16 => 2.0,
            _ => 0.0,
        };
        let per_lane = match self.port_attr.active_speed {
            1 => 2.5,
            2 => 5.0,
            4 | 8 => 10.0,
            16 => 14.0625,
            32 => 25.78125,
            64 => 53.125,
            128 => 106.25,
            _ => 0.0,
        };
        lanes * per_lane
    }

    /// Opens the device and port `wanted` names (the first of a list).
    pub fn open(lib: &'static Verbs, wanted: &Wanted, gid_env: Option<String>) -> Result<Device> {
        Self::listed(lib, |devs| Self::pick(lib, devs, wanted, gid_env))
    }

    /// Opens every device and port `wanted` lists, in order (one rail
    /// each); with no list, the one [`Device::open`] picks. A listed
    /// device that is missing, listed twice or has no usable port is an
    /// error naming it; nothing stays open then.
    pub fn open_all(
        lib: &'static Verbs,
        wanted: &Wanted,
        gid_env: Option<String>,
    ) -> Result<Vec<Device>> {
        if wanted.choices.len() <= 1 {
            return Ok(vec![Self::open(lib, wanted, gid_env)?]);
        }
        if wanted.choices.len() > crate::transport::MAX_RAILS {
            return Err(Error::config(format!(
                "verbs: {}: {} devices, at most {} rails",
                wanted.source,
                wanted.choices.len(),
                crate::transport::MAX_RAILS
            )));
        }
        for (i, c) in wanted.choices.iter().enumerate() {
            if wanted.choices[..i].contains(c) {
                return Err(Error::config(format!(
                    "verbs: {}: device {}{} is listed twice",
                    wanted.source,
                    c.0,
                    c.1.map(|p| format!(":{p}")).unwrap_or_default()
                )));
            }
        }
        Self::listed(lib, |devs| {
            let mut open: Vec<Device> = Vec::new();
            for c in &wanted.choices {
                let one = Wanted {
                    choices: vec![c.clone()],
                    source: wanted.source.clone(),
                };
                let got = Self::pick(lib, devs, &one, gid_env.clone()).and_then(|d| {
                    // `mlx5_0` and `mlx5_0:1` can name one port.
                    if open.iter().any(|o| o.name == d.name && o.port == d.port) {
                        // SAFETY: opened by `pick`, nothing made on it.
                        unsafe { (lib.ibv_close_device)(d.ctx) };
                        return Err(Error::config(format!(
                            "verbs: {}: device {}:{} is listed twice",
                            wanted.source, d.name, d.port
                        )));
                    }
                    Ok(d)
                });
                match got {
                    Ok(d) => open.push(d),
                    Err(e) => {
                        for d in &open {
                            // SAFETY: opened by `pick`, nothing made on it.
                            unsafe { (lib.ibv_close_device)(d.ctx) };
                        }
                        return Err(e);
                    }
                }
            }
            Ok(open)
        })
    }

    /// Runs `f` over the named device list, freed after.
    fn listed<T>(
        lib: &'static Verbs,
        f: impl FnOnce(&[(String, *mut ibv_device)]) -> Result<T>,
    ) -> Result<T> {
        let mut n = 0;
        // SAFETY: `n` is writable; the list is freed below.
        let list = unsafe { (lib.ibv_get_device_list)(&mut n) };
        if list.is_null() || n <= 0 {
            if !list.is_null() {
                // SAFETY: from ibv_get_device_list.
                unsafe { (lib.ibv_free_device_list)(list) };
            }
            return Err(Error::Unsupported(format!(
                "verbs: no RDMA device found (ibv_get_device_list through {}): no NIC, driver or provider here",
                lib.from
            )));
        }
        let mut devs = Vec::new();
        for i in 0..n as usize {
            // SAFETY: the list holds `n` devices.
            let d = unsafe { *list.add(i) };
            // SAFETY: a listed device; the name is NUL-terminated.
            let name = unsafe { CStr::from_ptr((lib.ibv_get_device_name)(d)) }
                .to_string_lossy()
                .into_owned();
            devs.push((name, d));
        }
        let r = f(&devs);
        // SAFETY: opened contexts keep their device alive after the list is
        // freed (verbs.h).
        unsafe { (lib.ibv_free_device_list)(list) };
        r
    }

    fn pick(
        lib: &'static Verbs,
        devs: &[(String, *mut ibv_device)],
        wanted: &Wanted,
        gid_env: Option<String>,
    ) -> Result<Device> {
        let names: Vec<&str> = devs.iter().map(|d| d.0.as_str()).collect();
        let candidates: Vec<(usize, Option<u8>)> = if wanted.choices.is_empty() {
            (0..devs.len()).map(|i| (i, None)).collect()
        } else {
            let mut c = Vec::new();
            for (name, port) in &wanted.choices {
                match names.iter().position(|n| n == name) {
                    Some(i) => c.push((i, *port)),
                    None => {
                        return Err(Error::config(format!(
                            "verbs: {}: no RDMA device {name:?} (devices here: {})",
                            wanted.source,
                            names.join(", ")
                        )))
                    }
                }
            }
            c
        };
        let mut why = Vec::new();
        for (i, port) in candidates {
            let (name, d) = &devs[i];
            // SAFETY: a listed device.
            let ctx = unsafe { (lib.ibv_open_device)(*d) };
            if ctx.is_null() {
                why.push(format!(
                    "{name}: ibv_open_device: {}",
                    std::io::Error::last_os_error()
                ));
                continue;
            }
            match Self::at_port(lib, ctx, name, port, gid_env.as_deref()) {
                Ok(dev) => return Ok(dev),
                Err(e) => {
                    why.push(e);
                    // SAFETY: opened above, nothing made on it.
                    unsafe { (lib.ibv_close_device)(ctx) };
                }
            }
        }
        Err(Error::Unsupported(format!(
            "verbs: no usable RDMA port ({}): {}",
            wanted.source,
            why.join("; ")
        )))
    }

    fn at_port(
        lib: &'static Verbs,
        ctx: *mut ibv_context,
        name: &str,
        port: Option<u8>,
        gid_env: Option<&str>,
    ) -> std::result::Result<Device, String> {
        let mut attr = ibv_device_attr::default();
        // SAFETY: a live context, a writable attribute struct.
        let rc = unsafe { (lib.ibv_query_device)(ctx, &mut attr) };
        if rc != 0 {
            return Err(format!(
                "{name}: ibv_query_device: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        let ports: Vec<u8> = match port {
            Some(p) => vec![p],
            None => (1..=attr.phys_port_cnt.max(1)).collect(),
        };
        let mut why = Vec::new();
        for p in ports {
            let mut pa = ibv_port_attr::default();
            // SAFETY: as above.
            let rc = unsafe { (lib.ibv_query_port)(ctx, p, &mut pa) };
            if rc != 0 {
                why.push(format!(
                    "{name}:{p}: ibv_query_port: {}",
                    std::io::Error::from_raw_os_error(rc)
                ));
                continue;
            }
            if pa.state != IBV_PORT_ACTIVE {
                why.push(format!(
                    "{name}:{p}: port is not active (state {})",
                    pa.state
                ));
                continue;
            }
            let mut dev = Device {
                ctx,
                name: name.to_string(),
                port: p,
                attr,
                port_attr: pa,
                gid_index: None,
                gid: [0; 16],
            };
            match dev.choose_gid(lib, gid_env) {
                Ok(()) => return Ok(dev),
                Err(e) => why.push(e),
            }
        }
        Err(why.join("; "))
    }

    fn query_gid(&self, lib: &Verbs, index: u8) -> Option<[u8; 16]> {
        let mut g = ibv_gid { raw: [0; 16] };
        // SAFETY: a live context, a writable GID.
        let rc = unsafe { (lib.ibv_query_gid)(self.ctx, self.port, i32::from(index), &mut g) };
        // SAFETY: every bit pattern is a valid `raw`.
        (rc == 0).then_some(unsafe { g.raw })
    }

    /// Whether GID `index` is RoCE v2, when the library can tell.
    fn is_rocev2(&self, lib: &Verbs, index: u8) -> Option<bool> {
        if let Some(f) = lib._ibv_query_gid_ex {
            let mut e = ibv_gid_entry::default();
            // SAFETY: a live context, a writable entry of the size passed.
            let rc = unsafe {
                f(
                    self.ctx,
                    u32::from(self.port),
                    u32::from(index),
                    &mut e,
                    0,
                    std::mem::size_of::<ibv_gid_entry>(),
                )
            };
            if rc == 0 {
                return Some(e.gid_type == IBV_GID_TYPE_ROCE_V2);
            }
        }
        if let Some(f) = lib.ibv_query_gid_type {
            let mut t = 0u32;
            // SAFETY: as above (1: RoCE v2 in this older interface).
            if unsafe { f(self.ctx, self.port, u32::from(index), &mut t) } == 0 {
                return Some(t == 1);
            }
        }
        None
    }

    fn choose_gid(&mut self, lib: &Verbs, env: Option<&str>) -> std::result::Result<(), String> {
        let where_ = format!("{}:{}", self.name, self.port);
        if let Some(v) = env.filter(|v| !v.trim().is_empty()) {
            let i = v
                .trim()
                .parse::<u8>()
                .map_err(|_| format!("AFMESH_IB_GID_INDEX={v:?}: expected 0..=255"))?;
            let g = self.query_gid(lib, i).ok_or_else(|| {
                format!("{where_}: ibv_query_gid of AFMESH_IB_GID_INDEX={i} failed")
            })?;
            self.gid_index = Some(i);
            self.gid = g;
            return Ok(());
        }
        if !self.roce() {
            // InfiniBand: LID routing; GID 0 carries the subnet prefix.
            self.gid = self.query_gid(lib, 0).unwrap_or([0; 16]);
            if self.port_attr.lid == 0 {
                return Err(format!(
                    "{where_}: InfiniBand port has no LID (no subnet manager?)"
                ));
            }
            return Ok(());
        }
        let len = self.port_attr.gid_tbl_len.clamp(0, 256) as u16;
        let mut best: Option<(u8, [u8; 16], u8)> = None;
        for i in 0..len {
            let i = i as u8;
            let Some(g) = self.query_gid(lib, i) else {
                continue;
            };
            if g == [0; 16] {
                continue;
            }
            let v4 = g[..10] == [0; 10] && g[10] == 0xff && g[11] == 0xff;
            let score = match (self.is_rocev2(lib, i), v4) {
                (Some(true), true) => 4,
                (Some(true), false) => 3,
                (None, true) => 2,
                (None, false) => 1,
                (Some(false), _) => 0,
            };
            if best.is_none_or(|b| score > b.2) {
                best = Some((i, g, score));
            }
        }
        match best {
            Some((i, g, _)) => {
                self.gid_index = Some(i);
                self.gid = g;
                Ok(())
            }
            None => Err(format!("{where_}: RoCE port has no usable GID")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(kv: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| kv.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn settings_defaults_and_overrides() {
        assert_eq!(Settings::from(env(&[])).unwrap(), Settings::default());
        let s = Settings::from(env(&[("AFMESH_QPS", "4"), ("AFMESH_IB_TIMEOUT", "18")])).unwrap();
        assert_eq!((s.qps, s.timeout), (4, 18));
        let e = Settings::from(env(&[("AFMESH_QPS", "9")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("AFMESH_QPS") && e.contains("1..=8"), "{e}");
        let e = Settings::from(env(&[("AFMESH_IB_RNR_RETRY", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("AFMESH_IB_RNR_RETRY"), "{e}");
    }

    #[test]
    fn device_lists_and_ports_parse() {
        let none = |_: &str| None;
        let w = Wanted::from(env(&[("AFMESH_IB_DEVICE", "mlx5_0:1, mlx5_1")]), none).unwrap();
        assert_eq!(
            w.choices,
            vec![("mlx5_0".into(), Some(1)), ("mlx5_1".into(), None)]
        );
        let e = Wanted::from(env(&[("AFMESH_IB_DEVICE", "mlx5_0:x")]), none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mlx5_0") && e.contains("\"x\""), "{e}");
        let w = Wanted::from(env(&[("DMLC_INTERFACE", "eth9")]), |i| {
            (i == "eth9").then(|| "mlx5_3".to_string())
        })
        .unwrap();
        assert_eq!(w.choices, vec![("mlx5_3".into(), None)]);
        assert!(Wanted::from(env(&[]), none).unwrap().choices.is_empty());
    }
}
