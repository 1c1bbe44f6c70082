<?php

declare(strict_types=1);

namespace TensorBridge\Internal;

use TensorBridge\DType;
use TensorBridge\ErrorCode;
use TensorBridge\Exception\InvalidInputException;
use TensorBridge\Exception\ProtocolException;
use TensorBridge\Exception\ServerException;
use TensorBridge\Exception\TensorBridgeException;
use TensorBridge\Exception\UnauthorizedException;
use TensorBridge\Tensor;
use TensorBridge\Transport\Reply;

/**
 * Open Inference Protocol (KServe v2) REST bodies with the binary tensor extension: inference
 * requests out, responses, model metadata and `{"error": ...}` bodies in.
 *
 * Every tensor travels as binary data (its bytes are the tensor encoding of spec §2, BYTES
 * included: each item a u32 little-endian length, then its bytes), so FP16 and BF16 need no JSON.
 *
 * @internal
 */
final class OipCodec
{
    /** the header that gives the JSON part's length when binary data follows it */
    public const JSON_LENGTH_HEADER = 'Inference-Header-Content-Length';

    /**
     * The body of an infer request and its headers.
     *
     * @param array<string, Tensor> $inputs
     * @param int $timeoutUs the time left for the request, sent as the `timeout` parameter (as Triton reads it)
     * @param string|null $routingKey sent as the `routing_key` parameter (servers other than TensorBridge ignore it)
     * @return array{0: string, 1: list<string>} body, headers
     */
    public static function inferRequest(array $inputs, int $timeoutUs, ?string $routingKey): array
    {
        $described = [];
        $data = [];
        foreach ($inputs as $name => $tensor) {
            $bytes = $tensor->bytes();
            $described[] = [
                'name' => $name,
                'shape' => $tensor->shape(),
                'datatype' => $tensor->dtype(),
                'parameters' => ['binary_data_size' => strlen($bytes)],
            ];
            $data[] = $bytes;
        }
        $parameters = ['binary_data_output' => true, 'timeout' => max(1, $timeoutUs)];
        if ($routingKey !== null) {
            $parameters['routing_key'] = $routingKey;
        }
        try {
            $json = json_encode(
                ['inputs' => $described, 'parameters' => $parameters],
                JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE,
            );
        } catch (\JsonException $e) {
            $message = 'input names and the routing key must be UTF-8: ' . $e->getMessage();
            throw new InvalidInputException($message, null, $e);
        }
        $headers = [
            'Content-Type: application/octet-stream',
            self::JSON_LENGTH_HEADER . ': ' . strlen($json),
        ];
        return [$json . implode('', $data), $headers];
    }

    /**
     * Reads a 200 infer response: outputs from binary data or JSON `data`, in the order sent.
     */
    public static function inferReply(HttpResponse $response): Reply
    {
        $body = $response->body;
        $jsonLength = $response->headers[strtolower(self::JSON_LENGTH_HEADER)] ?? null;
        if ($jsonLength !== null && (!ctype_digit($jsonLength) || (int) $jsonLength > strlen($body))) {
            throw new ProtocolException(sprintf('bad %s header "%s"', self::JSON_LENGTH_HEADER, $jsonLength));
        }
        $end = $jsonLength === null ? strlen($body) : (int) $jsonLength;
        $json = self::json(substr($body, 0, $end), 'infer response');
        $outputs = $json['outputs'] ?? null;
        if (!is_array($outputs) || !array_is_list($outputs)) {
            throw new ProtocolException('infer response has no "outputs" list');
        }
        $tensors = [];
        $pos = $end;
        foreach ($outputs as $out) {
            $name = is_array($out) ? ($out['name'] ?? null) : null;
            if (!is_string($name) || !is_array($out)) {
                throw new ProtocolException('infer response output without a name');
            }
            try {
                [$tensors[$name], $pos] = self::output($out, $body, $pos);
            } catch (InvalidInputException $e) {
                $message = sprintf('infer response output "%s": %s', $name, $e->getMessage());
                throw new ProtocolException($message, null, $e);
            }
        }
        if ($pos !== strlen($body)) {
            throw new ProtocolException(sprintf('infer response has %d bytes no output claims', strlen($body) - $pos));
        }
        $params = is_array($json['parameters'] ?? null) ? $json['parameters'] : [];
        $version = $json['model_version'] ?? null;
        $timing = ['queue_us' => 0, 'compute_us' => 0, 'preprocess_us' => 0, 'batch_size' => 0, 'version' => 0];
        foreach (['queue_us', 'compute_us', 'preprocess_us', 'batch_size'] as $key) {
            $timing[$key] = is_int($params[$key] ?? null) ? $params[$key] : 0;
        }
        $timing['version'] = match (true) {
            is_int($version) => $version,
            is_string($version) && ctype_digit($version) => (int) $version,
            default => 0,
        };
        return new Reply($tensors, $timing);
    }

    /**
     * One model's metadata (`GET v2/models/<m>`) as an entry of the local protocol's model list
     * (spec §4.1): inputs and outputs as given (null when the server declares none), numeric
     * versions as {version, state}.
     *
     * @param array<string, mixed> $meta
     * @param list<array{version: int, state: string}> $versions from the repository index, if it had any
     * @return array<string, mixed>
     */
    public static function modelEntry(string $name, array $meta, array $versions): array
    {
        if ($versions === [] && is_array($meta['versions'] ?? null)) {
            foreach ($meta['versions'] as $v) {
                if ((is_string($v) && ctype_digit($v)) || is_int($v)) {
                    $versions[] = ['version' => (int) $v, 'state' => 'ready'];
                }
            }
        }
        $side = static fn (mixed $list): ?array => is_array($list) && $list !== [] ? array_values($list) : null;
        return [
            'name' => $name,
            'inputs' => $side($meta['inputs'] ?? null),
            'outputs' => $side($meta['outputs'] ?? null),
            'versions' => $versions,
            'platform' => is_string($meta['platform'] ?? null) ? $meta['platform'] : '',
        ];
    }

    /**
     * The exception for a non-2xx answer: the protocol's `{"error": "..."}` message, typed by status.
     *
     * @param string $model the model the request was for ('' when none)
     */
    public static function error(
        HttpResponse $response,
        string $model,
        string $url,
        float $timeout,
    ): TensorBridgeException {
        $status = $response->status;
        $decoded = json_decode($response->body, true);
        $message = is_array($decoded) ? ($decoded['error'] ?? $decoded['detail'] ?? null) : null;
        if (!is_string($message)) {
            $message = trim(substr($response->body, 0, 300)) ?: 'no message';
        }
        $message .= sprintf(' (HTTP %d)', $status);
        $code = match (true) {
            $status === 400, $status === 422 => ErrorCode::INVALID_INPUT,
            $status === 404 && $model !== '' => ErrorCode::MODEL_NOT_FOUND,
            $status === 413 => ErrorCode::PAYLOAD_TOO_LARGE,
            $status === 408, $status === 504 => ErrorCode::DEADLINE_EXCEEDED,
            $status === 429, $status === 503 => ErrorCode::OVERLOADED,
            $status === 500 && $model !== '' => ErrorCode::MODEL_ERROR,
            $status === 500 => ErrorCode::INTERNAL,
            default => null,
        };
        if ($status === 401 || $status === 403) {
            return new UnauthorizedException(sprintf(
                'the server at %s refused the request: %s; check the bearer token (HttpOptions token)',
                $url,
                $message,
            ), ErrorCode::UNAUTHORIZED);
        }
        if ($status === 404 && $model === '') {
            return new ProtocolException(sprintf(
                'the server at %s has no such endpoint: %s; is it an Open Inference Protocol (v2) server?',
                $url,
                $message,
            ));
        }
        if ($code === null) {
            return new ServerException(sprintf('the server at %s answered: %s', $url, $message), ErrorCode::INTERNAL);
        }
        return ErrorMapper::toException(new ErrorReply($code->value, $message), $model, $timeout);
    }

    /**
     * Decodes a JSON object (with $list: a JSON array).
     *
     * @return array<mixed>
     */
    public static function json(string $text, string $what, bool $list = false): array
    {
        try {
            $data = json_decode($text, true, 64, JSON_THROW_ON_ERROR);
        } catch (\JsonException $e) {
            throw new ProtocolException(sprintf('%s is not valid JSON: %s', $what, $e->getMessage()), null, $e);
        }
        if (!is_array($data) || ($data !== [] && array_is_list($data) !== $list)) {
            throw new ProtocolException(sprintf('%s is not a JSON %s', $what, $list ? 'array' : 'object'));
        }
        return $data;
    }

    /**
     * One output tensor and the offset after its binary data.
     *
     * @param array<mixed> $out
     * @return array{0: Tensor, 1: int}
     */
    private static function output(array $out, string $body, int $pos): array
    {
        $datatype = $out['datatype'] ?? null;
        $dtype = is_string($datatype) && strtoupper($datatype) === $datatype ? DType::tryFromName($datatype) : null;
        if ($dtype === null) {
            throw new InvalidInputException(sprintf(
                'datatype %s is not one the PHP client supports',
                json_encode($datatype),
            ));
        }
        $shape = $out['shape'] ?? null;
        if (!is_array($shape) || !array_is_list($shape)) {
            throw new InvalidInputException('no shape');
        }
        $size = $out['parameters']['binary_data_size'] ?? null;
        if (is_int($size)) {
            if ($size < 0 || $size > strlen($body) - $pos) {
                throw new InvalidInputException(sprintf('binary_data_size %d runs past the body', $size));
            }
            return [Tensor::fromBytes(substr($body, $pos, $size), $dtype, $shape), $pos + $size];
        }
        if (!array_key_exists('data', $out) || !is_array($out['data'])) {
            throw new InvalidInputException('neither binary_data_size nor data');
        }
        $flat = [];
        array_walk_recursive($out['data'], static function (mixed $v) use (&$flat): void {
            $flat[] = $v;
        });
        $count = TensorCodec::elementCount($shape);
        if (count($flat) !== $count) {
            throw new InvalidInputException(sprintf('%d data items for shape %s', count($flat), json_encode($shape)));
        }
        return [Tensor::fromArray($flat, $dtype)->reshape($shape), $pos];
    }
}
