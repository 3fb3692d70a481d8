// The official OpenAI Node SDK against a running arkor-edge: the same checks as
// tests/python/sdk_check.py.
//
// Run the copy that tests/node/ensure-node-deps.sh DIR prints (DIR/sdk_check.mjs, next to the
// installed DIR/node_modules); this file alone cannot resolve its imports.
//
// Environment: EDGE_PORT (the edge's port on 127.0.0.1), EDGE_SCHEME (https or http), KEYED_HOST
// and KEYED_KEY (a fixed_api_key deployment), KEYED_MODEL (its pinned model), OPEN_HOST (an
// authMode "none" deployment), UNKNOWN_HOST (no deployment), and optionally EDGE_CA_FILE (PEM of
// the CA that signed the edge's certificate, trusted in addition to the default roots).
//
// The SDK gets the real base URL (EDGE_SCHEME://KEYED_HOST:EDGE_PORT/v1), so the Host header,
// TLS SNI and certificate verification all use the real host name; only the DNS lookup is
// overridden (every name resolves to 127.0.0.1) on the undici dispatcher handed to the SDK.
// Certificate verification is never disabled. Exits non-zero on the first failed check.

import fs from 'node:fs';
import tls from 'node:tls';

let OpenAI, Agent, undiciFetch;
try {
  ({ default: OpenAI } = await import('openai'));
  ({ Agent, fetch: undiciFetch } = await import('undici'));
} catch (e) {
  console.error(
    `FAILED: cannot load the SDK (${e.message}).\n` +
      'Install it with `bash tests/node/ensure-node-deps.sh DIR` and run the DIR/sdk_check.mjs it prints.',
  );
  process.exit(1);
}

function env(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`FAILED: environment variable ${name} is not set`);
    process.exit(1);
  }
  return v;
}

const PORT = env('EDGE_PORT');
const SCHEME = env('EDGE_SCHEME');
const KEYED_HOST = env('KEYED_HOST');
const KEY = env('KEYED_KEY');
const MODEL = env('KEYED_MODEL');
const OPEN_HOST = env('OPEN_HOST');
const UNKNOWN_HOST = env('UNKNOWN_HOST');
const CA_FILE = process.env.EDGE_CA_FILE || '';
if (SCHEME !== 'https' && SCHEME !== 'http') {
  console.error(`FAILED: EDGE_SCHEME must be https or http, not ${JSON.stringify(SCHEME)}`);
  process.exit(1);
}

let step = 'setup';

// A hung edge must fail the check, not the test runner's patience.
setTimeout(() => {
  console.error(`FAILED: ${step}: no answer within 60 s`);
  process.exit(1);
}, 60_000).unref();

// Every host name resolves to 127.0.0.1; the names asked for are recorded, so a request that
// bypassed the dispatcher (real DNS) is caught.
const resolved = new Set();
function lookup(hostname, options, callback) {
  if (typeof options === 'function') {
    callback = options;
    options = {};
  }
  resolved.add(hostname);
  if (options && options.all) callback(null, [{ address: '127.0.0.1', family: 4 }]);
  else callback(null, '127.0.0.1', 4);
}

// `ca` replaces Node's default trust store, so the defaults are passed along with the edge's CA.
const connect = { lookup };
if (CA_FILE) {
  const defaults =
    typeof tls.getCACertificates === 'function' ? tls.getCACertificates('default') : tls.rootCertificates;
  connect.ca = [...defaults, fs.readFileSync(CA_FILE, 'utf8')];
}
const dispatcher = new Agent({ connect });

const MESSAGES = [{ role: 'user', content: 'hello from the node sdk' }];
const EXPECTED = 'hello from the node sdk';
let checks = 0;

function check(cond, what) {
  if (!cond) {
    console.error(`FAILED: ${step}: ${what}`);
    process.exit(1);
  }
  checks += 1;
}

function client(host, apiKey) {
  return new OpenAI({
    baseURL: `${SCHEME}://${host}:${PORT}/v1`,
    apiKey,
    maxRetries: 0, // a refused request must surface as its error at once
    timeout: 30_000,
    // undici's own fetch, so that the undici `dispatcher` option is honoured.
    fetch: undiciFetch,
    fetchOptions: { dispatcher },
  });
}

// Runs `call`, which must throw an instance of `cls`; returns the error.
async function expectError(cls, call) {
  try {
    await call();
  } catch (e) {
    if (e instanceof cls) return e;
    throw e;
  }
  check(false, `no ${cls.name}: the request was served`);
}

const j = (v) => JSON.stringify(v);

try {
  const keyed = client(KEYED_HOST, KEY);

  // Non-streamed: the model the client names is ignored; the deployment's pinned model answers.
  step = 'non-streamed completion';
  let r = await keyed.chat.completions.create({ model: 'gpt-4o', messages: MESSAGES });
  check(r.choices[0].message.content === EXPECTED, `content ${j(r.choices[0].message.content)}`);
  check(r.model === MODEL, `model ${j(r.model)}`);
  check(r.usage?.completion_tokens === 5, `usage ${j(r.usage)}`);

  // Streamed, word by word.
  step = 'streamed completion';
  let stream = await keyed.chat.completions.create({ model: 'gpt-4o', messages: MESSAGES, stream: true });
  const parts = [];
  for await (const c of stream) if (c.choices?.length) parts.push(c.choices[0].delta?.content ?? '');
  check(parts.join('') === EXPECTED, `stream text ${j(parts)}`);
  check(parts.filter((p) => p).length === 5, `stream chunks ${j(parts)}`);

  // Streamed with usage.
  step = 'streamed completion with include_usage';
  stream = await keyed.chat.completions.create({
    model: 'x',
    messages: MESSAGES,
    stream: true,
    stream_options: { include_usage: true },
  });
  const usage = [];
  for await (const c of stream) if (c.usage != null) usage.push(c.usage);
  check(usage.length === 1 && usage[0].completion_tokens === 5, `stream usage ${j(usage)}`);

  // The model list holds the deployment's target.
  step = 'models.list()';
  const models = [];
  for await (const m of keyed.models.list()) models.push(m.id);
  check(j(models) === j([MODEL]), `models ${j(models)}`);

  // A wrong key is an AuthenticationError with the SPEC's code.
  step = 'wrong key';
  let e = await expectError(OpenAI.AuthenticationError, () =>
    client(KEYED_HOST, 'ark_live_wrongwrongwrongwrongwrong00').chat.completions.create({
      model: 'x',
      messages: MESSAGES,
    }),
  );
  check(e.status === 401, `status ${e.status}`);
  check(e.code === 'invalid_api_key', `code ${j(e.code)}`);

  // An unknown slug is a NotFoundError.
  step = 'unknown slug';
  e = await expectError(OpenAI.NotFoundError, () =>
    client(UNKNOWN_HOST, KEY).chat.completions.create({ model: 'x', messages: MESSAGES }),
  );
  check(e.status === 404, `status ${e.status}`);
  check(e.code === 'deployment_not_found', `code ${j(e.code)}`);

  // A public deployment needs no key (the SDK still wants a non-empty one).
  step = 'public deployment';
  r = await client(OPEN_HOST, 'not-needed').chat.completions.create({ model: 'x', messages: MESSAGES });
  check(r.choices[0].message.content === EXPECTED, `open deployment answer ${j(r.choices[0].message.content)}`);

  // Every request went through the overridden lookup, under its real host name.
  step = 'dns override';
  const hosts = [KEYED_HOST, UNKNOWN_HOST, OPEN_HOST].map((h) => h.toLowerCase());
  check(hosts.every((h) => resolved.has(h)), `looked up ${j([...resolved])}, expected ${j(hosts)}`);
} catch (err) {
  // An unexpected error (a connection or TLS failure, a wrong error class): name it and its causes.
  let msg = `${err?.constructor?.name ?? 'Error'}: ${err?.message ?? err}`;
  if (err?.status !== undefined) msg += ` (status ${err.status}, code ${j(err.code)})`;
  for (let c = err?.cause; c; c = c.cause) msg += `\n  caused by ${c.code ? `${c.code}: ` : ''}${c.message ?? c}`;
  console.error(`FAILED: ${step}: ${msg}`);
  process.exit(1);
}

await dispatcher.close();
console.log(`node sdk: ${checks} checks passed`);
