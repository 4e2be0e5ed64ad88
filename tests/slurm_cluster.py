"""
A real, private, single-node Slurm cluster for the tests of slurm/ (tests/test_slurm.py).

    with SlurmCluster() as cluster:           # installs Slurm if needed, starts munged, slurmctld, slurmd
        job = cluster.sbatch("slurm/train.job", "--max_steps", "50", options=["--partition=cpu", "--gpus=0"])
        cluster.wait_state(job, "COMPLETED")
        print(cluster.diagnostics(job))       # daemon logs and the job's output, for assertion messages

Everything it makes lies in one temporary folder: a munge key and a munged of its own (its own socket,
so it never touches a system munged or /etc/munge), slurm.conf (named by SLURM_CONF for every Slurm
command it runs, and exported to the jobs), state and spool folders, daemon logs. The daemons run in
the foreground as children of this process (root; ports chosen free), and stop() ends them, the job
processes they started (found by that SLURM_CONF in their environment) and removes the folder.

Run it by hand to get a cluster to play with (Ctrl-C stops it):

    python tests/slurm_cluster.py            # prints `export SLURM_CONF=...`; then sbatch, squeue, ...
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SLURM_PACKAGES = ["slurm-wlm", "munge"]
SLURM_PROGRAMS = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "munged", "mungekey"]
PARTITION = "cpu"  # the one partition of the test cluster (a CPU-only partition, as far as the scripts know)
# A requeued job is held (JobState PENDING, Reason BeginTime) until the credential of its previous run expires:
# BeginTime = requeue time + cred_expire + 1 s, cred_expire being 120 s by default (slurm.conf AuthInfo). Forcing
# it earlier (`scontrol update JobId=N StartTime=now`) is a race: when the job reaches slurmd before that
# credential expired, slurmd refuses it ("Job N already killed, do not launch batch job") and the job FAILS.
# So the test cluster shortens cred_expire instead: requeued jobs start again after 6 s.
CRED_EXPIRE = 5


class SlurmError(RuntimeError):
    pass


def apt_install(packages, programs):
    """Install Debian packages unless all of programs are on PATH already (apt-get update first only if needed)."""
    if all(shutil.which(p) for p in programs):
        return
    if os.geteuid() != 0:
        raise SlurmError(f"{', '.join(packages)} missing and not root: apt-get install -y {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *packages]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # stale or missing package lists: update them once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    missing = [p for p in programs if not shutil.which(p)]
    if result.returncode != 0 or missing:
        raise SlurmError(f"`{' '.join(command)}` failed (exit {result.returncode}; missing {missing}):\n"
                         f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def free_ports(n):
    """n TCP ports that are free right now (bound once by the OS, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def resolves(name):
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def tail(path, n=60):
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        return f"({path}: {e.strerror})"
    return "".join(lines[-n:])


class SlurmCluster:
    """A single-node Slurm started and stopped by this process. Use it as a context manager, or start()/stop()."""

    def __init__(self, root=None, partition=PARTITION, cred_expire=CRED_EXPIRE):
        self.root = os.path.abspath(root or tempfile.mkdtemp(prefix="slurm-test-"))
        self.partition = partition
        self.cred_expire = cred_expire
        self.conf = os.path.join(self.root, "slurm.conf")
        self.hostname = socket.gethostname().split(".")[0]  # hostname -s: slurmctld must run on SlurmctldHost
        # the node's name, which jobs see (SLURM_JOB_NODELIST) and may connect to (the multi-node job's
        # rendezvous): this host's short name if it resolves, as on a real cluster, else localhost
        self.node_name = self.hostname if resolves(self.hostname) else "localhost"
        self.daemons = {}  # name -> Popen, in start order
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for name in list(self.env):  # we may run inside a Slurm job ourselves: not that job's settings
            if name.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and name != "SLURM_CONF":
                del self.env[name]

    # ------------------------------------------------------------------------------------------ set up
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout=90):
        """Install Slurm if missing, write the configuration, start the daemons, wait for an idle node.
        Stops whatever it started if anything goes wrong."""
        try:
            apt_install(SLURM_PACKAGES, SLURM_PROGRAMS)
            self._write_config()
            self._start_munged()
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            self._wait(lambda: self.scontrol("ping", check=False).stdout.count("UP") > 0, timeout,
                       "slurmctld answering `scontrol ping`")
            self._start_daemon("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", self.node_name])
            self._wait(lambda: self.node_state().startswith("IDLE"), timeout, f"node {self.node_name} IDLE")
        except BaseException as e:
            report = self.diagnostics()
            self.stop()
            if isinstance(e, Exception):
                raise SlurmError(f"could not start the test Slurm cluster: {e}\n{report}") from e
            raise

    def _write_config(self):
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(self.root, 0o755)  # job processes (root here) read slurm.conf; munge wants no world-writable dir
        hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60, env=self.env)
        node_line = next((line for line in hardware.stdout.splitlines() if line.startswith("NodeName=")), None)
        if hardware.returncode != 0 or node_line is None:
            raise SlurmError(f"`slurmd -C` failed: {hardware.stdout}{hardware.stderr}")
        # the real CPUs and memory of this machine, under its short host name, reached on the loopback
        node_line = re.sub(r"^NodeName=\S+", f"NodeName={self.node_name} NodeAddr=127.0.0.1", node_line)
        ctld_port, slurmd_port = free_ports(2)
        r = self.root
        self.munge_socket = os.path.join(r, "munge", "munge.socket")
        config = f"""\
# written by tests/slurm_cluster.py for one test session; removed at its end
ClusterName=microgpt-test
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
{node_line} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(config)

    def _start_munged(self):
        """A munged of our own: own key, socket, pid, log and seed files in the temporary folder."""
        folder = os.path.dirname(self.munge_socket)
        os.makedirs(folder, mode=0o755, exist_ok=True)
        key = os.path.join(folder, "munge.key")
        if not os.path.exists(key):
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=60)
        os.chmod(key, 0o600)
        self._start_daemon("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                      f"--key-file={key}", f"--pid-file={folder}/munged.pid",
                                      f"--log-file={self.root}/log/munged.log", f"--seed-file={folder}/munged.seed"])
        self._wait(lambda: os.path.exists(self.munge_socket), 30, "munged's socket")

    def _start_daemon(self, name, command):
        log = open(os.path.join(self.root, "log", f"{name}.stdout"), "ab")
        self.daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              env=self.env, start_new_session=True)
        log.close()

    def _wait(self, condition, timeout, what, interval=0.2):
        deadline = time.monotonic() + timeout
        while True:
            for name, process in self.daemons.items():
                if process.poll() is not None:
                    raise SlurmError(f"{name} exited with code {process.returncode} while waiting for {what}")
            if condition():
                return
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    # ------------------------------------------------------------------------------------------ tear down
    def stop(self, timeout=30):
        """Cancel every job, stop the daemons, kill any process left with our SLURM_CONF, remove the folder."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--signal=KILL", f"--partition={self.partition}"],
                           env=self.env, capture_output=True, timeout=30)
            subprocess.run(["scancel", f"--partition={self.partition}"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.squeue("%T", check=False).strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.daemons.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._kill_leftovers()
        if os.environ.get("SLURM_TEST_KEEP"):  # debugging: keep the logs
            print(f"kept {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self):
        """Processes whose environment names our slurm.conf: slurmstepd and job processes of this cluster."""
        marker = f"SLURM_CONF={self.conf}\0".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if marker in f.read() + b"\0":
                            pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def _kill_leftovers(self):
        for _ in range(50):
            pids = self.leftover_pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.1)

    # ------------------------------------------------------------------------------------------ commands
    def run(self, *command, check=True, timeout=60, **kwargs):
        """A Slurm command against this cluster; raises SlurmError with its output if it fails and check."""
        result = subprocess.run(list(command), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                                timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise SlurmError(f"`{' '.join(command)}` exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def scontrol(self, *args, **kwargs):
        return self.run("scontrol", *args, **kwargs)

    def squeue(self, fmt="%i %T", check=True):
        return self.run("squeue", "-h", "-o", fmt, check=check).stdout

    def node_state(self):
        result = self.run("sinfo", "-h", "-N", "-n", self.node_name, "-o", "%T", check=False)
        return result.stdout.strip().upper() if result.returncode == 0 else ""

    def sbatch(self, script, *args, options=(), env=None, cwd=None):
        """Submit script with sbatch options before it and args after it (passed to the script); the job id."""
        result = self.run("sbatch", "--parsable", *options, script, *args, env=env or self.env, cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id):
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} once Slurm forgot it."""
        result = self.scontrol("show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", result.stdout))

    def wait_state(self, job_id, states, timeout=120, interval=0.3, on_pending=None):
        """Wait until the job is in one of states (e.g. "COMPLETED" or ("FAILED", "COMPLETED")); its info.
        on_pending(info) is called while it waits in PENDING (e.g. to let a requeued job start now)."""
        states = (states,) if isinstance(states, str) else tuple(states)
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if on_pending and info.get("JobState") == "PENDING":
                on_pending(info)
            for name, process in self.daemons.items():
                if process.poll() is not None:
                    raise SlurmError(f"{name} died (exit {process.returncode})\n{self.diagnostics(job_id)}")
            time.sleep(interval)
        raise SlurmError(f"job {job_id} not {'/'.join(states)} after {timeout} s: {info.get('JobState')} "
                         f"({info.get('Reason')})\n{self.diagnostics(job_id)}")

    def diagnostics(self, job_id=None):
        """What to read when something failed: the job, its output files, squeue and the daemon logs."""
        parts = []
        if job_id is not None:
            info = self.job(job_id)
            parts.append(f"--- scontrol show job {job_id}\n" + " ".join(f"{k}={v}" for k, v in info.items()))
            for key in ("StdOut", "StdErr"):
                if info.get(key):
                    parts.append(f"--- {key} {info[key]}\n{tail(info[key])}")
        if os.path.exists(self.conf):
            parts.append("--- squeue\n" + self.squeue("%i %j %T %r %M", check=False))
        for name in ("slurmctld.log", "slurmd.log", "munged.log", "slurmctld.stdout", "slurmd.stdout",
                     "munged.stdout"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                parts.append(f"--- {name}\n{tail(path, 40)}")
        return "\n".join(parts)


if __name__ == "__main__":
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}\n# logs in {cluster.root}/log; Ctrl-C (or SIGTERM) stops the cluster",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
