#!/usr/bin/env python3
"""Make the official OSS SDK (oss2 >= 2.18.4, signature V4 via ProviderAuthV4) send a table of
requests to a loopback OSS server, for `aliyun/tests/oss_sdk_crosscheck.rs`.

Usage: aliyun_oss_sdk.py http://127.0.0.1:PORT BUCKET

The Rust test owns the server (the project's local OSS, which records every request) and
recomputes each captured Authorization header and presigned URL with the project's signer;
this script only drives the SDK. Every JSON line it prints stands for exactly one HTTP request,
in order:
  {"case", "kind": "request", "method", "key", "sts", "additional": [...]}
  {"case", "kind": "presign", "method", "key", "sts", "url", "headers", "additional"}
    (the presigned URL is then fetched once, so the server checks it too)

The endpoint must be loopback: the script refuses anything else, so it can never reach a real
Alibaba endpoint. The keys are made up; the server knows them.
"""

import json
import sys
from urllib.parse import urlparse

import oss2
from oss2.credentials import StaticCredentialsProvider
from oss2.models import PartInfo

REGION = "cn-hangzhou"
STATIC = ("LTAI5tOssStaticKey", "oss-static-secret/with+odd=chars")
STS = ("STS.NUOssRoleKey", "oss-sts-secret", "CAIS+oss/token=with==padding")

KEYS = [
    "plain.txt",
    "迁移网关/诊断 包.tar.gz",
    "odd*star~tilde+plus space.bin",
    "a/b/c/deep path/file",
]


def emit(**fields):
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def bucket_for(endpoint, name, creds):
    provider = StaticCredentialsProvider(*creds)
    auth = oss2.ProviderAuthV4(provider)
    return oss2.Bucket(auth, endpoint, name, region=REGION)


def run(endpoint, name, creds, sts):
    b = bucket_for(endpoint, name, creds)
    tag = "sts" if sts else "static"

    def req(case, method, key, additional=()):
        emit(case=f"{tag}:{case}", kind="request", method=method, key=key, sts=sts,
             additional=list(additional))

    for i, key in enumerate(KEYS):
        data = f"object {i} {key}".encode()
        if i % 2:
            req(f"put-meta-{i}", "PUT", key)
            b.put_object(key, data, headers={
                "x-oss-meta-owner": "sync gateway",
                "x-oss-meta-Case": "Mixed*Case~",
                "Content-Type": "text/plain; charset=utf-8",
            })
        else:
            req(f"put-{i}", "PUT", key)
            b.put_object(key, data)
        req(f"head-{i}", "HEAD", key)
        b.head_object(key)
        req(f"get-{i}", "GET", key)
        got = b.get_object(key).read()
        assert got == data, (got, data)
        req(f"get-range-{i}", "GET", key)
        b.get_object(key, byte_range=(0, 3)).read()

    # Extra headers signed through AdditionalHeaders (oss2 only does this when asked).
    key = KEYS[1]
    r = oss2.http.Request("GET", b._make_url(name, key), headers={
        "Range": "bytes=0-3", "Cache-Control": "no-cache"}, region=REGION, product="oss")
    b.auth._sign_request(r, name, key, in_additional_headers=["range", "cache-control"])
    req("get-additional", "GET", key, ["cache-control", "range"])
    resp = b.session.do_request(r, timeout=30)
    assert resp.status // 100 == 2, resp.status
    resp.read()

    # Multipart: initiate (with metadata), two parts, complete; then one aborted upload.
    key = KEYS[3] + ".multipart"
    req("initiate", "POST", key)
    upload_id = b.init_multipart_upload(key, headers={"x-oss-meta-purpose": "image upload"}).upload_id
    part1 = b"1" * (100 * 1024)
    req("part-1", "PUT", key)
    r1 = b.upload_part(key, upload_id, 1, part1)
    req("part-2", "PUT", key)
    r2 = b.upload_part(key, upload_id, 2, b"tail")
    req("complete", "POST", key)
    b.complete_multipart_upload(key, upload_id, [PartInfo(1, r1.etag), PartInfo(2, r2.etag)])
    req("initiate-abort", "POST", KEYS[2])
    upload_id = b.init_multipart_upload(KEYS[2]).upload_id
    req("abort", "DELETE", KEYS[2])
    b.abort_multipart_upload(KEYS[2], upload_id)

    # Presigned GETs, fetched once each.
    for i, key in enumerate(KEYS):
        url = b.sign_url("GET", key, 600)
        emit(case=f"{tag}:presign-{i}", kind="presign", method="GET", key=key, sts=sts,
             url=url, headers={}, additional=[])
        b.get_object_with_url(url).read()
    headers = {"Range": "bytes=1-2"}
    url = b.sign_url("GET", KEYS[0], 600, headers=headers, additional_headers=["range"])
    emit(case=f"{tag}:presign-additional", kind="presign", method="GET", key=KEYS[0], sts=sts,
         url=url, headers=headers, additional=["range"])
    b.get_object_with_url(url, headers=headers).read()

    for i, key in enumerate(KEYS):
        req(f"delete-{i}", "DELETE", key)
        b.delete_object(key)


def main():
    endpoint, name = sys.argv[1], sys.argv[2]
    host = urlparse(endpoint).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing non-loopback endpoint {endpoint}")
    emit(kind="version", version=oss2.__version__)
    run(endpoint, name, STATIC, False)
    run(endpoint, name, STS, True)


if __name__ == "__main__":
    main()
