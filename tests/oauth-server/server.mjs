// A real OAuth 2.0 authorization server for token-sidecar's tests: node `oidc-provider`
// (OpenID Certified), issuing client_credentials tokens to a client that authenticates with
// private_key_jwt (ES256), bound by DPoP with server nonces required. Beside it, /resource/*
// plays a resource server: it accepts a token only if the server issued it, it is bound to the
// key that signed this request's DPoP proof, and the proof is for this request.
//
//   node server.mjs PORT CERT.pem KEY.pem CLIENT_PUBLIC_KEY.pem
//
// It prints "listening" once it serves on https://127.0.0.1:PORT.
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';

import { calculateJwkThumbprint, EmbeddedJWK, jwtVerify } from 'jose';
import Provider from 'oidc-provider';

const [port, certFile, keyFile, clientKeyFile] = process.argv.slice(2);
const issuer = `https://127.0.0.1:${port}`;
const clientJwk = crypto.createPublicKey(fs.readFileSync(clientKeyFile)).export({ format: 'jwk' });

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'custom-client',
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'ES256',
    jwks: { keys: [clientJwk] },
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    scope: 'payments',
  }],
  scopes: ['payments'],
  clientAuthMethods: ['private_key_jwt'],
  features: {
    clientCredentials: { enabled: true },
    dPoP: { enabled: true, nonceSecret: crypto.randomBytes(32), requireNonce: () => true },
    devInteractions: { enabled: false },
  },
  ttl: { ClientCredentials: 600 },
});

const seen = { issued: 0, resource: [] };
provider.on('grant.success', () => { seen.issued += 1; });
provider.on('grant.error', (ctx, err) => { console.error(`grant.error ${err.message} ${err.error_description ?? ''}`); });

/** The resource server's check of one request; the refusal reason, or null. */
async function refusal(req) {
  const [scheme, token] = (req.headers.authorization ?? '').split(' ');
  if (scheme !== 'DPoP' || !token) return 'not a DPoP authorization';
  const stored = await provider.ClientCredentials.find(token);
  if (!stored) return 'a token this server did not issue';
  if (!stored.jkt) return 'a token not bound to a key';
  let proof;
  try {
    proof = await jwtVerify(req.headers.dpop ?? '', EmbeddedJWK, { typ: 'dpop+jwt', algorithms: ['ES256'] });
  } catch (err) {
    return `the proof does not verify: ${err.message}`;
  }
  if (await calculateJwkThumbprint(proof.protectedHeader.jwk) !== stored.jkt) return 'the proof is by another key';
  const url = new URL(req.url, issuer);
  if (proof.payload.htm !== req.method || proof.payload.htu !== `${issuer}${url.pathname}`) return 'htm/htu';
  if (proof.payload.ath !== crypto.hash('sha256', token, 'base64url')) return 'ath';
  return null;
}

const callback = provider.callback();
const server = https.createServer({
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
}, async (req, res) => {
  if (req.url === '/seen') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(seen));
  } else if (req.url.startsWith('/resource/')) {
    const why = await refusal(req);
    seen.resource.push(why ?? 'ok');
    res.statusCode = why ? 401 : 200;
    res.end(why ?? 'paid');
  } else {
    callback(req, res);
  }
});
server.listen(Number(port), '127.0.0.1', () => console.log('listening'));
