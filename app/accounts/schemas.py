"""Request and response bodies of the account routes (marshmallow, for flask-smorest and the OpenAPI document)."""
from marshmallow import Schema, fields, validate

# Bounds on what a client may send: an address is at most 254 characters (RFC 5321), and a
# password is hashed whole, so its length bounds the work one request can ask for.
EMAIL = {"required": True, "validate": validate.Length(max=254), "metadata": {"example": "ada@example.com"}}
PASSWORD_LENGTH = validate.Length(min=8, max=1024, error="The password needs 8 to 1024 characters.")
# Length and pattern together: `$` alone would let a trailing newline through.
CODE = {"required": True, "validate": [validate.Length(equal=6, error="The code is the 6 digits of the mail."),
                                       validate.Regexp(r"^[0-9]{6}$", error="The code is the 6 digits of the mail.")],
        "metadata": {"example": "123456"}}


class StrictSchema(Schema):
    class Meta:
        # Unknown fields are refused (422): a typo in a field name is not silently ignored.
        unknown = "raise"


class CredentialsSchema(StrictSchema):
    email = fields.Email(**EMAIL)
    password = fields.String(required=True, validate=PASSWORD_LENGTH)


class LoginSchema(StrictSchema):
    email = fields.Email(**EMAIL)
    # Any length up to the bound: a password set before a rule change must still log in.
    password = fields.String(required=True, validate=validate.Length(min=1, max=1024))


class EmailSchema(StrictSchema):
    email = fields.Email(**EMAIL)


class VerifyEmailSchema(StrictSchema):
    email = fields.Email(**EMAIL)
    code = fields.String(**CODE)


class ResetPasswordSchema(StrictSchema):
    email = fields.Email(**EMAIL)
    code = fields.String(**CODE)
    new_password = fields.String(required=True, validate=PASSWORD_LENGTH)


class UserSchema(Schema):
    id = fields.String(required=True)
    email = fields.String(required=True)
    email_verified = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)


class TokensSchema(Schema):
    access_token = fields.String(required=True)
    refresh_token = fields.String(required=True)
    token_type = fields.String(required=True, metadata={"example": "Bearer"})
    expires_in = fields.Integer(required=True, metadata={"description": "Seconds until the access token expires."})


class AccessTokenSchema(Schema):
    access_token = fields.String(required=True)
    token_type = fields.String(required=True, metadata={"example": "Bearer"})
    expires_in = fields.Integer(required=True)


class StatusSchema(Schema):
    status = fields.String(required=True)
    message = fields.String(required=True)
