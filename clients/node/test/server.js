'use strict';
// Starts the real key-authority binary ($KEY_AUTHORITY_BIN, else ../../target/debug/key-authority)
// on a free 127.0.0.1 port with a temporary SQLite database and a random admin token, for the
// suites in this folder (`npm test` runs test/*.test.js; this file holds no tests). A server can
// be stopped (SIGTERM) and started again on the same address and database, as a restarted replica.

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const { KeyAuthority } = require('..');

const CLIENT_DIR = path.join(__dirname, '..');
const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 20_000;

function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

function serverEnv(adminToken, extra) {
  // Only this suite's configuration: drop anything the caller's environment would add.
  const env = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (name.startsWith('KEY_AUTHORITY_') || name.startsWith('OTEL_') || name === 'DATABASE_URL') {
      continue;
    }
    env[name] = value;
  }
  env.KEY_AUTHORITY_ADMIN_TOKEN = adminToken;
  env.RUST_LOG = env.RUST_LOG || 'info';
  return { ...env, ...extra };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Starts a server and resolves to { target, adminToken, log(), stop(), start(), remove() }:
 * stop() ends it with SIGTERM and resolves to { code, signal }; start() runs it again on the same
 * address and database; remove() stops it and deletes its folder. `env` adds KEY_AUTHORITY_...
 * settings, `args` flags of `key-authority serve` (such as '--webhook-allow-private-targets').
 */
async function startServer({ env = {}, args = [] } = {}) {
  const binary =
    process.env.KEY_AUTHORITY_BIN ||
    path.join(CLIENT_DIR, '..', '..', 'target', 'debug', 'key-authority');
  if (!fs.existsSync(binary)) {
    throw new Error(
      `server binary not found at ${binary}: run cargo build or set KEY_AUTHORITY_BIN`,
    );
  }
  const folder = fs.mkdtempSync(path.join(os.tmpdir(), 'key-authority-node-'));
  const adminToken = `kaadmin_node_${crypto.randomBytes(16).toString('hex')}`;
  const target = `127.0.0.1:${await freePort()}`;
  let log = '';
  let running = null;

  async function start() {
    if (running) throw new Error('already running');
    const child = spawn(
      binary,
      [
        'serve',
        '--listen',
        target,
        '--database-url',
        `sqlite://${path.join(folder, 'keys.db')}`,
        '--shutdown-grace',
        '5s',
        ...args,
      ],
      { env: serverEnv(adminToken, env), stdio: ['ignore', 'pipe', 'pipe'] },
    );
    child.stdout.on('data', (chunk) => (log += chunk));
    child.stderr.on('data', (chunk) => (log += chunk));
    const exited = new Promise((resolve) =>
      child.once('exit', (code, signal) => resolve({ code, signal })),
    );
    // Never leave the server behind, even if this process exits abruptly.
    const killOnExit = () => child.kill('SIGKILL');
    process.once('exit', killOnExit);
    running = { child, exited, killOnExit };

    const probe = new KeyAuthority(target, { timeoutMs: 1000 });
    const deadline = Date.now() + START_TIMEOUT_MS;
    try {
      for (;;) {
        if (child.exitCode !== null) {
          throw new Error(`key-authority exited with ${child.exitCode} before serving:\n${log}`);
        }
        try {
          if ((await probe.healthStatus('')) === 'SERVING') break;
        } catch {
          // not listening yet
        }
        if (Date.now() > deadline) {
          child.kill('SIGKILL');
          throw new Error(
            `key-authority did not report SERVING within ${START_TIMEOUT_MS} ms:\n${log}`,
          );
        }
        await sleep(50);
      }
    } finally {
      probe.close();
    }
  }

  async function stop() {
    if (!running) return { code: 0, signal: null };
    const { child, exited, killOnExit } = running;
    running = null;
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    const result = await exited;
    clearTimeout(timer);
    process.removeListener('exit', killOnExit);
    return result;
  }

  async function remove() {
    const result = await stop();
    fs.rmSync(folder, { recursive: true, force: true });
    return result;
  }

  await start();
  return { target, adminToken, log: () => log, start, stop, remove };
}

module.exports = { startServer, sleep, CLIENT_DIR };
