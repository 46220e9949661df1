/* glucoagent_auth: a mosquitto 2.0 plugin (API v5) that binds the MQTT client id to the certificate.
 *
 * Why: with `use_identity_as_username true` mosquitto 2.0.11 takes the certificate CN as the user
 * name and skips every authentication plugin, so any fleet certificate could connect with any
 * client id and make the broker close the real owner's connection (and drop its session). Here the
 * listener has `require_certificate true` and `use_identity_as_username false`, so mosquitto runs
 * MOSQ_EVT_BASIC_AUTH for every CONNECT, after TLS verified the chain (and the CRL) and *before*
 * connect__on_authorised() looks for an existing client with the same id (src/handle_connect.c).
 * A refusal here is a CONNACK "not authorised" (MQTT 5: 0x87), and the other client is untouched.
 *
 * Rules (the names come from backend/broker.py as plugin_opt_* lines):
 *   CN == backend_cn  client id starts with backend_prefix      (the reference cloud)
 *   CN == claim_cn    client id starts with claim_prefix        (factory claim, provisioning only)
 *   any other CN      a device id [a-z0-9][a-z0-9-]{2,63} that neither starts with either prefix
 *                     nor ends with "-<side suffix>"; client id == CN, or CN "-" <side suffix>
 *                     (the box's short side connections: renewal check, status)
 * The user name becomes the CN whatever the client sent, so the acl_file's user/pattern rules apply.
 * Optional device_username_hub (the Azure IoT Hub fake, testbed/clouds/azure_fake.py): a device's CONNECT
 * user name must then be "<hub>/<client id>/?<query with api-version=...>", as IoT Hub requires.
 * Optional dps_id_scope (the fake's Device Provisioning Service): the claim certificate may then also log in
 * with a device id as client id (DPS: ClientId = registrationId) and the user name
 * "<scope>/registrations/<client id>/api-version=...".
 *
 * MOSQ_EVT_CONTROL on control_topic (the acl_file lets only the backend write it, and the handler
 * checks the publisher is the backend too): the payload is an identity whose every connection is
 * closed at once, used by `glucoagent-backend revoke` after the broker reloaded its CRL.
 *
 * Cloud limits (optional, all off unless set; testbed/clouds/aws_fake.py sets AWS IoT Core's): a PUBLISH or
 * SUBSCRIBE whose topic has more than max_topic_slashes slashes (the 3 of a "$aws/rules/<rule>/" prefix not
 * counted) or more than max_topic_bytes bytes, a PUBLISH whose payload exceeds max_payload bytes, and the
 * PUBLISHes of a connection beyond max_publish_rate per second (the backend identity excepted: in a fake it
 * stands for the cloud's own services) are refused in MOSQ_EVT_ACL_CHECK. A refusal there is what the
 * acl_file's is: MQTT 5 PUBACK 0x87 / SUBACK 0x87, MQTT 3.1.1 a PUBACK and the message dropped. Anything
 * allowed is deferred to the acl_file, which judges next.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_NAME 64
#define MAX_SUFFIXES 8
#define RATE_SLOTS 1024 /* connections tracked for max_publish_rate; more share slots (stricter, never looser) */

struct settings {
    char backend_cn[MAX_NAME + 1];
    char backend_prefix[MAX_NAME + 1];
    char claim_cn[MAX_NAME + 1];
    char claim_prefix[MAX_NAME + 1];
    char control_topic[256];
    char username_hub[256];
    char dps_scope[MAX_NAME + 1];
    char suffixes[MAX_SUFFIXES][MAX_NAME + 1];
    int suffix_count;
    bool reloading;
    long max_topic_slashes, max_topic_bytes, max_payload, max_publish_rate; /* 0: no limit */
};

struct rate_slot {
    time_t second;
    long count;
};
static struct rate_slot rates[RATE_SLOTS];

static mosquitto_plugin_id_t *plugin_id;
static struct settings cfg;

static bool starts_with(const char *s, const char *prefix) {
    return prefix[0] != '\0' && strncmp(s, prefix, strlen(prefix)) == 0;
}

/* "<cn>-<suffix>" for one of the side suffixes */
static bool is_side_id(const char *client_id, const char *cn) {
    size_t n = strlen(cn);
    if (strncmp(client_id, cn, n) != 0 || client_id[n] != '-') return false;
    for (int i = 0; i < cfg.suffix_count; i++) {
        if (strcmp(client_id + n + 1, cfg.suffixes[i]) == 0) return true;
    }
    return false;
}

static bool ends_with_side_suffix(const char *cn) {
    size_t n = strlen(cn);
    for (int i = 0; i < cfg.suffix_count; i++) {
        size_t m = strlen(cfg.suffixes[i]);
        if (n > m + 1 && cn[n - m - 1] == '-' && strcmp(cn + n - m, cfg.suffixes[i]) == 0) return true;
    }
    return false;
}

/* agent/wire/topics.py DEVICE_ID_RE: ^[a-z0-9][a-z0-9-]{2,63}$ */
static bool is_device_id(const char *s) {
    size_t n = strlen(s);
    if (n < 3 || n > 64) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (c == '-' && i > 0);
        if (!ok) return false;
    }
    return true;
}

/* The single CN of the peer certificate into out; false when absent, repeated, too long or with a NUL. */
static bool peer_cn(struct mosquitto *client, char out[MAX_NAME + 1]) {
    X509 *cert = mosquitto_client_certificate(client);
    if (cert == NULL) return false;
    bool ok = false;
    X509_NAME *name = X509_get_subject_name(cert);
    int i = name ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
    if (i >= 0 && X509_NAME_get_index_by_NID(name, NID_commonName, i) == -1) {
        ASN1_STRING *data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));
        int len = data ? ASN1_STRING_length(data) : -1;
        const unsigned char *bytes = data ? ASN1_STRING_get0_data(data) : NULL;
        if (bytes && len > 0 && len <= MAX_NAME && memchr(bytes, '\0', (size_t)len) == NULL) {
            memcpy(out, bytes, (size_t)len);
            out[len] = '\0';
            ok = true;
        }
    }
    X509_free(cert); /* mosquitto_client_certificate hands us a reference */
    return ok;
}

static const char *refusal(const char *cn, const char *client_id) {
    if (strcmp(cn, cfg.backend_cn) == 0) {
        return starts_with(client_id, cfg.backend_prefix) ? NULL : "the backend's client id must start with its prefix";
    }
    if (strcmp(cn, cfg.claim_cn) == 0) {
        /* a DPS registration (ClientId = registration id, a device id; user name checked later), never one that
           takes the backend's prefix: that login would take over the backend's connection and its session */
        if (cfg.dps_scope[0] && is_device_id(client_id) && !starts_with(client_id, cfg.backend_prefix)) return NULL;
        return starts_with(client_id, cfg.claim_prefix) ? NULL : "the claim's client id must start with its prefix";
    }
    if (!is_device_id(cn) || starts_with(cn, cfg.claim_prefix) || starts_with(cn, cfg.backend_prefix)
        || ends_with_side_suffix(cn)) {
        return "the certificate names no valid device id";
    }
    if (strcmp(client_id, cn) == 0 || is_side_id(client_id, cn)) return NULL;
    return "a device's client id must be its certificate's CN";
}

/* Microsoft Learn "Communicate with an IoT hub using the MQTT protocol": Username
   "{iotHub-hostname}/{device-id}/?api-version=2021-04-12" (api-version recommended; we require one). */
static const char *hub_username_refusal(const char *username, const char *client_id) {
    size_t h = strlen(cfg.username_hub), c = strlen(client_id);
    if (username == NULL) return "no user name (expected <hub>/<device id>/?api-version=...)";
    if (strncmp(username, cfg.username_hub, h) != 0 || username[h] != '/') return "user name names another hub";
    if (strncmp(username + h + 1, client_id, c) != 0 || strncmp(username + h + 1 + c, "/?", 2) != 0) {
        return "user name names another device";
    }
    const char *query = username + h + 1 + c + 2;
    if (strncmp(query, "api-version=", 12) != 0 && strstr(query, "&api-version=") == NULL) {
        return "user name has no api-version";
    }
    return NULL;
}

/* Microsoft Learn "Communicate with DPS using the MQTT protocol": Username
   "{idScope}/registrations/{registration_id}/api-version=2019-03-31", registration id = ClientId. */
static const char *dps_username_refusal(const char *username, const char *client_id) {
    size_t s = strlen(cfg.dps_scope), c = strlen(client_id);
    if (username == NULL) return "no user name (expected <scope>/registrations/<id>/api-version=...)";
    if (strncmp(username, cfg.dps_scope, s) != 0 || strncmp(username + s, "/registrations/", 15) != 0) {
        return "user name names another ID scope";
    }
    if (strncmp(username + s + 15, client_id, c) != 0 || username[s + 15 + c] != '/') {
        return "user name names another registration id";
    }
    return strstr(username + s + 16 + c, "api-version=") ? NULL : "user name has no api-version";
}

static int on_basic_auth(int event, void *event_data, void *userdata) {
    (void)event;
    (void)userdata;
    struct mosquitto_evt_basic_auth *ev = event_data;
    char cn[MAX_NAME + 1];
    const char *client_id = mosquitto_client_id(ev->client);
    if (!peer_cn(ev->client, cn)) {
        /* On SIGHUP mosquitto re-checks every known client, offline sessions included (they have no
           TLS session). Every listener requires a certificate, so outside a reload a CONNECT without
           one cannot reach us; during a reload, keep the session: it is judged when it connects. */
        if (cfg.reloading) return MOSQ_ERR_SUCCESS;
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "glucoagent-auth: refused client %s: no usable certificate CN",
                             client_id ? client_id : "?");
        return MOSQ_ERR_AUTH;
    }
    const char *why = client_id ? refusal(cn, client_id) : "no client id";
    if (why != NULL) {
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "glucoagent-auth: refused client id %s for certificate %s: %s",
                             client_id ? client_id : "?", cn, why);
        return MOSQ_ERR_AUTH;
    }
    if (cfg.dps_scope[0] && strcmp(cn, cfg.claim_cn) == 0 && !starts_with(client_id, cfg.claim_prefix)) {
        why = dps_username_refusal(ev->username, client_id);
        if (why != NULL) {
            mosquitto_log_printf(MOSQ_LOG_NOTICE, "glucoagent-auth: refused registration %s: %s", client_id, why);
            return MOSQ_ERR_AUTH;
        }
    }
    if (cfg.username_hub[0] && strcmp(cn, cfg.backend_cn) != 0 && strcmp(cn, cfg.claim_cn) != 0) {
        why = hub_username_refusal(ev->username, client_id);
        if (why != NULL) {
            mosquitto_log_printf(MOSQ_LOG_NOTICE, "glucoagent-auth: refused client id %s: %s", client_id, why);
            return MOSQ_ERR_AUTH;
        }
    }
    if (mosquitto_set_username(ev->client, cn) != MOSQ_ERR_SUCCESS) return MOSQ_ERR_AUTH;
    return MOSQ_ERR_SUCCESS;
}

static int on_control(int event, void *event_data, void *userdata) {
    (void)event;
    (void)userdata;
    struct mosquitto_evt_control *ev = event_data;
    const char *who = mosquitto_client_username(ev->client);
    if (who == NULL || strcmp(who, cfg.backend_cn) != 0) return MOSQ_ERR_ACL_DENIED;
    char target[MAX_NAME + 1];
    if (ev->payloadlen == 0 || ev->payloadlen > MAX_NAME || memchr(ev->payload, '\0', ev->payloadlen)) {
        return MOSQ_ERR_INVAL;
    }
    memcpy(target, ev->payload, ev->payloadlen);
    target[ev->payloadlen] = '\0';
    if (strcmp(target, cfg.backend_cn) == 0) return MOSQ_ERR_INVAL; /* never cut the cloud off itself */
    int rc = mosquitto_kick_client_by_username(target, true);
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "glucoagent-auth: disconnected every connection of %s (%s)", target,
                         rc == MOSQ_ERR_SUCCESS ? "done" : "none connected");
    return MOSQ_ERR_SUCCESS;
}

static const char *topic_refusal(const char *topic) {
    size_t n = strlen(topic);
    if (cfg.max_topic_bytes && (long)n > cfg.max_topic_bytes) return "topic too long";
    if (cfg.max_topic_slashes) {
        const char *counted = topic;
        if (strncmp(topic, "$aws/rules/", 11) == 0) { /* Basic Ingest: its prefix's slashes do not count */
            const char *end = strchr(topic + 11, '/');
            counted = end ? end + 1 : topic + n;
        }
        long slashes = 0;
        for (const char *c = counted; *c; c++) slashes += (*c == '/');
        if (slashes > cfg.max_topic_slashes) return "too many slashes in the topic";
    }
    return NULL;
}

static bool over_rate(struct mosquitto *client) {
    size_t i = ((size_t)client >> 4) % RATE_SLOTS;
    time_t now = time(NULL);
    if (rates[i].second != now) {
        rates[i].second = now;
        rates[i].count = 0;
    }
    /* connections sharing a slot share its count: stricter, never looser */
    return ++rates[i].count > cfg.max_publish_rate;
}

static int on_acl_check(int event, void *event_data, void *userdata) {
    (void)event;
    (void)userdata;
    struct mosquitto_evt_acl_check *ev = event_data;
    if (ev->access != MOSQ_ACL_WRITE && ev->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;
    const char *why = topic_refusal(ev->topic);
    if (why == NULL && ev->access == MOSQ_ACL_WRITE) {
        const char *who = mosquitto_client_username(ev->client);
        if (cfg.max_payload && (long)ev->payloadlen > cfg.max_payload) why = "payload too large";
        else if (cfg.max_publish_rate && !(who && strcmp(who, cfg.backend_cn) == 0) && over_rate(ev->client)) {
            why = "publish rate exceeded";
        }
    }
    if (why == NULL) return MOSQ_ERR_PLUGIN_DEFER;
    const char *id = mosquitto_client_id(ev->client);
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "glucoagent-auth: refused %s from %s on %s (%u bytes): %s",
                         ev->access == MOSQ_ACL_WRITE ? "PUBLISH" : "SUBSCRIBE", id ? id : "?", ev->topic,
                         ev->payloadlen, why);
    return MOSQ_ERR_ACL_DENIED;
}

static bool limits_set(void) {
    return cfg.max_topic_slashes || cfg.max_topic_bytes || cfg.max_payload || cfg.max_publish_rate;
}

static bool parse_limit(long *dst, const char *value) {
    char *end = NULL;
    if (value == NULL) return false;
    long v = strtol(value, &end, 10);
    if (end == value || *end != '\0' || v < 0) return false;
    *dst = v;
    return true;
}

static int on_reload(int event, void *event_data, void *userdata) {
    (void)event;
    (void)event_data;
    (void)userdata;
    cfg.reloading = true; /* until the next tick: mosquitto re-checks its clients in between */
    return MOSQ_ERR_PLUGIN_DEFER;
}

static int on_tick(int event, void *event_data, void *userdata) {
    (void)event;
    (void)event_data;
    (void)userdata;
    cfg.reloading = false;
    return MOSQ_ERR_SUCCESS;
}

static bool copy_opt(char *dst, size_t size, const char *value) {
    if (value == NULL || strlen(value) >= size) return false;
    strcpy(dst, value);
    return true;
}

static bool parse_suffixes(const char *value) {
    char buf[MAX_SUFFIXES * (MAX_NAME + 1)];
    if (!copy_opt(buf, sizeof buf, value)) return false;
    cfg.suffix_count = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (cfg.suffix_count == MAX_SUFFIXES || !copy_opt(cfg.suffixes[cfg.suffix_count], MAX_NAME + 1, tok)) {
            return false;
        }
        cfg.suffix_count++;
    }
    return true;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions) {
    for (int i = 0; i < supported_version_count; i++) {
        if (supported_versions[i] == 5) return 5;
    }
    return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *opts,
                          int opt_count) {
    (void)userdata;
    memset(&cfg, 0, sizeof cfg);
    for (int i = 0; i < opt_count; i++) {
        const char *k = opts[i].key, *v = opts[i].value;
        bool ok = true;
        if (strcmp(k, "backend_cn") == 0) ok = copy_opt(cfg.backend_cn, sizeof cfg.backend_cn, v);
        else if (strcmp(k, "backend_prefix") == 0) ok = copy_opt(cfg.backend_prefix, sizeof cfg.backend_prefix, v);
        else if (strcmp(k, "claim_cn") == 0) ok = copy_opt(cfg.claim_cn, sizeof cfg.claim_cn, v);
        else if (strcmp(k, "claim_prefix") == 0) ok = copy_opt(cfg.claim_prefix, sizeof cfg.claim_prefix, v);
        else if (strcmp(k, "control_topic") == 0) ok = copy_opt(cfg.control_topic, sizeof cfg.control_topic, v);
        else if (strcmp(k, "side_suffixes") == 0) ok = parse_suffixes(v);
        else if (strcmp(k, "max_topic_slashes") == 0) ok = parse_limit(&cfg.max_topic_slashes, v);
        else if (strcmp(k, "max_topic_bytes") == 0) ok = parse_limit(&cfg.max_topic_bytes, v);
        else if (strcmp(k, "max_payload") == 0) ok = parse_limit(&cfg.max_payload, v);
        else if (strcmp(k, "max_publish_rate") == 0) ok = parse_limit(&cfg.max_publish_rate, v);
        else if (strcmp(k, "device_username_hub") == 0) ok = copy_opt(cfg.username_hub, sizeof cfg.username_hub, v);
        else if (strcmp(k, "dps_id_scope") == 0) ok = copy_opt(cfg.dps_scope, sizeof cfg.dps_scope, v);
        else {
            mosquitto_log_printf(MOSQ_LOG_ERR, "glucoagent-auth: unknown option %s", k);
            return MOSQ_ERR_INVAL;
        }
        if (!ok) {
            mosquitto_log_printf(MOSQ_LOG_ERR, "glucoagent-auth: option %s is too long or not a number", k);
            return MOSQ_ERR_INVAL;
        }
    }
    if (!cfg.backend_cn[0] || !cfg.backend_prefix[0] || !cfg.claim_cn[0] || !cfg.claim_prefix[0]
        || !cfg.control_topic[0]) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "glucoagent-auth: backend_cn, backend_prefix, claim_cn, claim_prefix "
                                           "and control_topic are required");
        return MOSQ_ERR_INVAL;
    }
    plugin_id = identifier;
    int rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
    if (rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL);
    if (rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL);
    if (rc == MOSQ_ERR_SUCCESS) {
        rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_CONTROL, on_control, cfg.control_topic, NULL);
    }
    if (rc == MOSQ_ERR_SUCCESS && limits_set()) {
        rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "glucoagent-auth: could not register its callbacks (%d)", rc);
        return rc;
    }
    mosquitto_log_printf(MOSQ_LOG_INFO, "glucoagent-auth: client ids bound to certificate CNs");
    return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *opts, int opt_count) {
    (void)userdata;
    (void)opts;
    (void)opt_count;
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_CONTROL, on_control, cfg.control_topic);
    if (limits_set()) mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
    return MOSQ_ERR_SUCCESS;
}
